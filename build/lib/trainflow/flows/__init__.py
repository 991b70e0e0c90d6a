"""Prefect flows of trainflow, plus the TrainConfig and the CLI generated from it."""

import sys

from trainflow.tasks.cache.imported import record_imports

# First thing, as in tasks/: cache keys read the text each module was compiled from.
record_imports(sys.modules[__name__])
