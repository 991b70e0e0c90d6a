"""The training engine: the epoch loop, its step, ranks, checkpoints, models, losses, schedules and
metrics. Imports no Prefect."""
