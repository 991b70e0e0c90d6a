"""The training engine: the step and the loop, options, checkpoints, models, DDP."""
