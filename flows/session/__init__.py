"""The command-line session: the local Prefect server and the plumbing around a run started from a
terminal."""
