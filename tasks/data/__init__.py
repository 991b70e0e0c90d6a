"""Data I/O: table readers, sources, memory-mapped and streamed data, batches, prediction writers."""
