"""Data I/O: tensors from files, tables, memory-mapped data, sources, batches."""
