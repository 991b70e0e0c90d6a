"""Defaults shared by the config and the stages, in a module light enough to import first."""

DEFAULT_CACHE_DIR = ".trainflow/cache"  # relative to the working folder, beside runs/
