"""The pipeline's stages: one module each, pure functions plus thin Prefect task wrappers."""

import sys

from trainflow.tasks.cache.imported import record_imports

# First thing: every module imported from here on is compiled from the text that cache keys
# read (tasks/cache/imported.py).
record_imports(sys.modules[__name__])
