"""The stage cache: keys of inputs and code, the store, the stage wrapper."""
