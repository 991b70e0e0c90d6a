"""Training options beyond the seed's (schedule, early stopping, export, clipping, precision,
metrics) and the processes that train (DDP): frozen values, light enough for flows/config.py
to build before torch is imported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCHEDULES = ("none", "step", "cosine", "onecycle")
# Schedules whose shape depends on the run's length: their first N epochs differ between a
# short and a long run, so a longer run can't continue a shorter one's checkpoints.
LENGTH_DEPENDENT = ("cosine", "onecycle")


@dataclass(frozen=True)
class TrainingOptions:
    """Defaults change nothing: the seed's training, bit for bit."""

    lr_schedule: str = "none"
    warmup_epochs: int = 0
    step_size: int = 30  # lr_schedule "step": epochs between decays
    gamma: float = 0.1  # lr_schedule "step": decay factor
    min_lr: float = 0.0  # lr_schedule "cosine": the floor it anneals to
    early_stopping_patience: int = 0  # 0: off
    early_stopping_min_delta: float = 0.0
    export: str = "last"  # "best": the weights of the lowest validation loss
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    precision: str = "32"  # "bf16": autocast the forward pass
    metrics: bool = True  # the validation metrics each epoch (tasks/engine/metrics.py)
    extra_metrics: tuple[str, ...] = ()  # the project's own, by name (tasks/project.py)
    augment: tuple[str, ...] = ()  # per-batch training transforms (tasks/engine/augment.py)
    crop_padding: int = 4  # augment "crop": zero padding on each side
    augment_seed: int = 0  # each batch's draws come from (seed, epoch, batch)

    def normalized(self) -> TrainingOptions:
        """Knobs the chosen schedule ignores at their defaults: they stay out of cache keys."""
        plain = TrainingOptions()
        return dataclasses.replace(
            self,
            step_size=self.step_size if self.lr_schedule == "step" else plain.step_size,
            gamma=self.gamma if self.lr_schedule == "step" else plain.gamma,
            min_lr=self.min_lr if self.lr_schedule == "cosine" else plain.min_lr,
            early_stopping_min_delta=self.early_stopping_min_delta
            if self.early_stopping_patience
            else plain.early_stopping_min_delta,
            crop_padding=self.crop_padding if "crop" in self.augment else plain.crop_padding,
            augment_seed=self.augment_seed if self.augment else plain.augment_seed,
        )

    @property
    def schedule_needs_length(self) -> bool:
        return self.lr_schedule in LENGTH_DEPENDENT


@dataclass(frozen=True)
class Launch:
    """How many processes train one run, and where they meet (torchrun's names)."""

    nproc: int = 1  # processes per node
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous; "" on one node: a free port
    max_restarts: int = 3  # of all the ranks together, after a rank died or hung
    hang_timeout: float = 300.0  # seconds a collective waits for a rank before it fails

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1
