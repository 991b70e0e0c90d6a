"""Data I/O: table readers, sources, memory-mapped and streamed data, splits, batches, and
prediction writers."""
