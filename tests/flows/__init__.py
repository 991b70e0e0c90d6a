"""The flows end to end: the CLI, the cache, resume, failures, sweeps, servers, deployments."""
