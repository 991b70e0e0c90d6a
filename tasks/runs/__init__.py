"""Run management: the run folder, the fence against a second attempt, TensorBoard curves, finding
a run."""
