"""The stage cache: keys of inputs and code, the entry store, pruning, and the Prefect task wrapper
that consults them."""
