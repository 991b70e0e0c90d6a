"""TrainConfig: the one set of knobs behind the CLI flags and the Prefect UI form."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from trainflow.tasks.engine.options import Launch, TrainingOptions
from trainflow.tasks.names import (
    ACTIVATIONS,
    DEVICE_CHOICES,
    DEVICE_PATTERN,
    OPTIMIZERS,
    SYNTHETIC,
)
from trainflow.tasks.rules import (
    DEFAULT_CACHE_DIR,
    augmentation_names,
    loss_names,
    metric_names,
    model_names,
    train_size,
)

MAX_SEED = 2**63 - 1
# Checked by the validators below and, as JSON-schema patterns, by the Prefect server before a
# deployment run exists (the UI form rejects a bad value at once).
DEVICE = DEVICE_PATTERN
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ENDPOINT = r"^$|^[A-Za-z0-9.-]+:\d{1,5}$"


def _split_commas(value: object) -> object:
    # The CLI and env-style inputs give "64,64"; the UI form gives a JSON list. Accept both.
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CommaList = BeforeValidator(_split_commas)


def _known_device(device: str) -> str:
    if not re.fullmatch(DEVICE, device):
        raise ValueError(f"must be {DEVICE_CHOICES}")
    return device


# A torch device by name; checked the same way for training and for prediction.
KnownDevice = AfterValidator(_known_device)


def _known(
    names: tuple[str, ...], known: tuple[str, ...], what: str, table: str
) -> tuple[str, ...]:
    for name in names:
        if name not in known:
            offered = ", ".join(known) or f"none: register one in your project's {table}"
            raise ValueError(f"unknown {what} {name!r} (known: {offered})")
    if len(set(names)) != len(names):
        raise ValueError(f"an {what} is named twice")
    return names


class TrainConfig(BaseModel):
    """Defaults reproduce chapter 2 of *Deep Learning with PyTorch Step-by-Step*."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # --- data -------------------------------------------------------------------------------
    data: str = Field(
        SYNTHETIC,
        min_length=1,
        description="'synthetic' (the tutorial's y = 1 + 2x + noise), a .csv/.parquet/"
        ".feather/.arrow table, a .npz/.pt/.pth/.safetensors file of arrays x (N×…) and y "
        "(N×T targets or N class ids), local or any fsspec URL; or a local folder of images "
        "in class folders (root/<class>/*.png|jpg|…).",
    )
    image_size: Annotated[tuple[int, ...], CommaList] = Field(
        (),
        description="An image folder's H,W: every image resized to it (needed when sizes "
        "differ); default: as stored.",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65536}},
    )
    target: Annotated[tuple[str, ...], CommaList] = Field(
        (),
        description="A table's target column name(s), comma-separated; default: the last column.",
    )
    features: Annotated[tuple[str, ...], CommaList] = Field(
        (),
        description="A table's feature column name(s), comma-separated; only these are read "
        "(Parquet/Feather skip the rest on disk); default: every column but the targets. A "
        "text column is categorical (one-hot, vocabulary from the training rows).",
    )
    data_identity: Literal["content", "version"] = Field(
        "content",
        description="How the cache knows a remote data file: 'content' hashes its bytes (exact; "
        "reads the whole file on every run, a local file always), 'version' trusts the store's "
        "version metadata (ETag, version id, or size and mtime): a hit reads nothing, but a "
        "store that serves other bytes under the same version serves a stale result.",
    )
    n_samples: int = Field(100, ge=1, le=10**9, description="Rows of synthetic data.")
    data_seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed of numpy's RandomState for synthetic data."
    )
    noise: float = Field(0.1, ge=0, le=1e6, description="Std of the synthetic data's noise.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Fraction of rows held out for validation."
    )
    split_seed: int = Field(13, ge=0, le=MAX_SEED, description="Seed of the train/val split.")

    # --- batching ---------------------------------------------------------------------------
    batch_size: int = Field(16, ge=1, le=2**31 - 1, description="Rows per mini-batch.")
    shuffle_seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed of the training batches' shuffle order."
    )
    loader: Literal["tensor", "dataloader"] = Field(
        "tensor",
        description="'tensor': batches are index slices of tensors already on the device "
        "(fast); 'dataloader': torch DataLoader, for data that does not fit that design.",
    )
    num_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes (loader='dataloader' only)."
    )

    # --- model ------------------------------------------------------------------------------
    model: Literal[model_names()] = Field(  # type: ignore[valid-type]
        "linear",
        description="'linear': nn.Sequential(nn.Linear(F, T)); 'mlp': hidden layers; or a "
        "model of your own project's (its trainflow.toml or pyproject.toml [tool.trainflow."
        "models]), or of an installed package's 'trainflow.models' entry point.",
    )
    hidden: Annotated[tuple[int, ...], CommaList] = Field(
        (64, 64),
        description="MLP hidden layer sizes, comma-separated (model='mlp' only).",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 2**20}},
    )
    activation: Literal[ACTIVATIONS] = Field(  # type: ignore[valid-type]
        "relu", description="MLP activation (model='mlp' only)."
    )
    init_seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the initial weights.")
    standardize: bool = Field(
        False,
        description="Standardize each feature with the mean and std of the training rows, "
        "inside the model (model.pt2 takes raw rows; model.safetensors holds the statistics).",
    )

    # --- optimisation -----------------------------------------------------------------------
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "sgd", description="Optimizer."
    )
    lr: float = Field(0.1, gt=0, le=100, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay (L2 / decoupled).")
    loss: Literal[loss_names()] = Field(  # type: ignore[valid-type]
        "mse",
        description="Loss function (mean reduction), or one your project registers "
        "([tool.trainflow.losses]).",
    )
    epochs: int = Field(200, ge=1, le=10**7, description="Training epochs.")
    lr_schedule: Literal["none", "step", "cosine", "onecycle"] = Field(
        "none",
        description="Learning-rate schedule: 'step' (x gamma every step_size epochs), 'cosine' "
        "(to min_lr at the last epoch), 'onecycle' (up to lr over warmup_epochs, then down; "
        "per step); per epoch otherwise.",
    )
    warmup_epochs: int = Field(
        0, ge=0, le=10**7, description="Epochs of linear warm-up to lr before the schedule."
    )
    step_size: int = Field(
        30, ge=1, le=10**7, description="Epochs between decays (lr_schedule='step' only)."
    )
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor (lr_schedule='step' only).")
    min_lr: float = Field(
        0.0, ge=0, le=100, description="The lr cosine anneals to (lr_schedule='cosine' only)."
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        le=10**7,
        description="Stop after this many epochs without a better validation loss (0: off).",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, le=1e6, description="How much lower a validation loss must be to be better."
    )
    export: Literal["last", "best"] = Field(
        "last",
        description="Weights to export: the last epoch's, or those of the lowest validation loss.",
    )
    grad_clip: float = Field(
        0.0, ge=0, le=1e6, description="Clip the global gradient norm to this (0: off)."
    )
    precision: Literal["32", "bf16"] = Field(
        "32",
        description="'bf16': autocast the forward pass to bfloat16 (the loss and the optimizer "
        "stay float32); needs a CPU or a CUDA device that has bfloat16.",
    )
    metrics: bool = Field(
        True,
        description="Validation metrics every epoch, chosen by the loss: MAE and R² for "
        "regression, accuracy (and F1, AUROC for two classes) for classification. Off: the "
        "losses and the lr only.",
    )
    extra_metrics: Annotated[tuple[str, ...], CommaList] = Field(
        (),
        description="Metrics of your project's ([tool.trainflow.metrics]) computed on the "
        "validation split every epoch, comma-separated.",
        json_schema_extra={"items": {"type": "string", "enum": list(metric_names())}}
        if metric_names()
        else None,
    )
    augment: Annotated[tuple[str, ...], CommaList] = Field(
        (),
        description="Per-batch training augmentations on the device, in order, comma-separated: "
        "'crop' (random crop of the zero-padded image), 'flip' (horizontal), or your "
        "project's ([tool.trainflow.augmentations]); validation batches never.",
        json_schema_extra={"items": {"type": "string", "enum": list(augmentation_names())}},
    )
    crop_padding: int = Field(
        4, ge=0, le=1024, description="Pixels of zero padding on each side for 'crop'."
    )
    augment_seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the augmentations' draws: each batch's come from (seed, epoch, "
        "batch) alone, so a resumed run draws what an uninterrupted one does.",
    )
    device: Annotated[str, KnownDevice] = Field(
        "auto",
        description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N', 'mps'.",
        json_schema_extra={"pattern": DEVICE},
    )

    # --- processes (DDP; README: "Many processes and machines") ------------------------------
    nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training processes on this node (torchrun's --nproc-per-node). Above 1, "
        "train-epochs runs DistributedDataParallel under torch's elastic launcher (gloo on "
        "the CPU, nccl with one GPU per process); batch_size stays the global batch.",
    )
    nnodes: int = Field(
        1, ge=1, le=1024, description="Machines in the job; each runs this command once."
    )
    node_rank: int = Field(
        0,
        ge=0,
        le=1023,
        description="This machine's place, 0 to nnodes-1; node 0 hosts "
        "the rendezvous at rdzv_endpoint.",
    )
    rdzv_endpoint: str = Field(
        "",
        description="host:port of node 0, where the nodes meet (c10d rendezvous); needed "
        "with nnodes > 1; on one node, a free port on 127.0.0.1.",
        json_schema_extra={"pattern": ENDPOINT},
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Times the launcher restarts all processes after one dies or hangs; each "
        "restart resumes from the last checkpoint.",
    )
    hang_timeout: float = Field(
        300.0,
        ge=1,
        le=86400,
        description="Seconds a process waits for the others at a collective before the job "
        "counts as hung and is restarted (longer than any checkpoint write or validation).",
    )

    # --- checkpoints ------------------------------------------------------------------------
    checkpoint_every_epochs: int = Field(
        0, ge=0, le=10**7, description="Checkpoint training every N epochs (0: only on time)."
    )
    checkpoint_every_seconds: float = Field(
        30.0,
        ge=0,
        le=7 * 86400,
        description="Checkpoint every S seconds of training, mid-epoch too (0: only by epoch). "
        "A checkpoint is also written at the end and on SIGINT/SIGTERM.",
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Checkpoints kept per config.")

    # --- outputs ----------------------------------------------------------------------------
    runs_dir: str = Field("runs", min_length=1, description="Folder holding one folder per run.")
    run_name: str | None = Field(
        None,
        description="Name of this run's folder under runs_dir; default: generated, unique.",
        json_schema_extra={"pattern": RUN_NAME},
    )

    # --- cache ------------------------------------------------------------------------------
    cache_dir: str = Field(
        DEFAULT_CACHE_DIR,
        min_length=1,
        description="Stage cache: a local folder or any fsspec URL (e.g. s3://bucket/cache) "
        "that several workers can share.",
    )
    refresh_cache: bool = Field(
        False, description="Recompute every cached stage and overwrite its entry."
    )
    no_cache: bool = Field(False, description="Bypass the cache: neither read nor write it.")

    @model_validator(mode="after")
    def _fits_together(self) -> TrainConfig:
        # What can be checked without the data; the rest is checked once it is loaded.
        if self.data == SYNTHETIC:
            if self.loss in ("cross_entropy", "bce_with_logits"):
                raise ValueError(
                    f"--loss {self.loss} needs class targets, but the synthetic data's target "
                    "is continuous (use mse, l1 or huber)"
                )
            n_train = train_size(self.n_samples, self.val_fraction)
            if n_train in (0, self.n_samples):
                empty = "training" if n_train == 0 else "validation"
                raise ValueError(
                    f"--val-fraction {self.val_fraction} leaves the {empty} split empty "
                    f"for --n-samples {self.n_samples}"
                )
        self._fits_the_schedule()
        if self.crop_padding != type(self).model_fields["crop_padding"].default and (
            "crop" not in self.augment
        ):
            raise ValueError("--crop-padding is for --augment crop")
        if self.early_stopping_min_delta and not self.early_stopping_patience:
            raise ValueError("--early-stopping-min-delta needs --early-stopping-patience")
        if self.precision == "bf16" and self.device.startswith("mps"):
            raise ValueError("--precision bf16 needs a CPU or CUDA device, not mps")
        self._fits_the_processes()
        return self

    def _fits_the_processes(self) -> None:
        if not re.fullmatch(ENDPOINT, self.rdzv_endpoint):
            raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint!r} must be host:port")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint (node 0's host:port)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        if self.nproc * self.nnodes > 1:
            if self.device == "mps":
                raise ValueError(f"--nproc {self.nproc}: torch.distributed can't train on mps")
            if re.fullmatch(r"cuda:\d+", self.device):
                raise ValueError(
                    f"--device {self.device} names one GPU, but each of --nproc {self.nproc} "
                    "processes takes its own (cuda:<local rank>): use --device cuda"
                )

    def _fits_the_schedule(self) -> None:
        owners = {"step_size": "step", "gamma": "step", "min_lr": "cosine"}
        for knob, schedule in owners.items():
            # Compared with the default, not "was it given": the UI form sends every field.
            default = type(self).model_fields[knob].default
            if getattr(self, knob) != default and self.lr_schedule != schedule:
                flag = "--" + knob.replace("_", "-")
                raise ValueError(f"{flag} is for --lr-schedule {schedule}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"--warmup-epochs {self.warmup_epochs} leaves no epoch of --epochs {self.epochs} "
                "after the warm-up"
            )
        if self.lr_schedule == "onecycle" and self.warmup_epochs == 0:
            raise ValueError("--lr-schedule onecycle needs --warmup-epochs (its rising phase) >= 1")
        if self.lr_schedule == "cosine" and self.min_lr >= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be below --lr {self.lr}")

    @property
    def training_options(self) -> TrainingOptions:
        """The options train-epochs takes as one value (the flow stays one screen)."""
        return TrainingOptions(
            lr_schedule=self.lr_schedule,
            warmup_epochs=self.warmup_epochs,
            step_size=self.step_size,
            gamma=self.gamma,
            min_lr=self.min_lr,
            early_stopping_patience=self.early_stopping_patience,
            early_stopping_min_delta=self.early_stopping_min_delta,
            export=self.export,
            grad_clip=self.grad_clip,
            precision=self.precision,
            metrics=self.metrics,
            extra_metrics=self.extra_metrics,
            augment=self.augment,
            crop_padding=self.crop_padding,
            augment_seed=self.augment_seed,
        )

    @property
    def launch(self) -> Launch:
        """How many processes train, and where they meet (one value for train-epochs)."""
        return Launch(
            nproc=self.nproc,
            nnodes=self.nnodes,
            node_rank=self.node_rank,
            rdzv_endpoint=self.rdzv_endpoint,
            max_restarts=self.max_restarts,
            hang_timeout=self.hang_timeout,
        )

    @field_validator("hidden")
    @classmethod
    def _positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(size < 1 or size > 2**20 for size in sizes):
            raise ValueError("hidden sizes must be between 1 and 1048576")
        return sizes

    @field_validator("image_size")
    @classmethod
    def _height_and_width(cls, size: tuple[int, ...]) -> tuple[int, ...]:
        if size and (len(size) != 2 or any(side < 1 or side > 65536 for side in size)):
            raise ValueError("must be H,W: two sizes between 1 and 65536")
        return size

    @field_validator("extra_metrics")
    @classmethod
    def _registered_metrics(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return _known(names, metric_names(), "metric", "[tool.trainflow.metrics]")

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return _known(names, augmentation_names(), "augmentation", "[tool.trainflow.augmentations]")

    @field_validator("run_name")
    @classmethod
    def _plain_run_name(cls, name: str | None) -> str | None:
        # The run name becomes a folder: keep every write inside runs_dir.
        if name is not None and not re.fullmatch(RUN_NAME, name):
            raise ValueError(
                "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return name


class PredictConfig(BaseModel):
    """Score a table with a trained run's model: one output row per input row."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str = Field(
        "latest",
        min_length=1,
        description="A run folder (or its model.pt2), 'latest' (the newest completed run under "
        "runs_dir), or the training flow run's id ('prefect.flow-run.<id>' from an event).",
    )
    runs_dir: str = Field("runs", min_length=1, description="Where 'latest' looks for runs.")
    data: str | None = Field(
        None,
        min_length=1,
        description="Rows to score: a .csv/.parquet/.feather/.arrow/.npz/.pt/.pth file (local "
        "or fsspec URL) with the "
        "model's feature columns (target columns optional: with them, metrics are reported), or "
        "'synthetic'; default: the data the model was trained on.",
    )
    data_identity: Literal["content", "version"] = Field(
        "content", description="How the cache knows a remote data file (as in training)."
    )
    out: str | None = Field(
        None,
        description="Output .csv, .parquet or .npz (local path or fsspec URL); default: "
        "predictions.csv in the model's run folder.",
    )
    batch_size: int = Field(65536, ge=1, le=2**31 - 1, description="Rows per forward pass.")
    device: Annotated[str, KnownDevice] = Field(
        "auto",
        description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.",
        json_schema_extra={"pattern": DEVICE},
    )
    cache_dir: str | None = Field(
        None,
        min_length=1,
        description="Stage cache: a local folder or fsspec URL; default: the training run's.",
    )
    refresh_cache: bool = Field(False, description="Score again and overwrite the cache entry.")
    no_cache: bool = Field(False, description="Bypass the cache: neither read nor write it.")

    @field_validator("out")
    @classmethod
    def _known_output_format(cls, out: str | None) -> str | None:
        if out is not None and not out.lower().endswith((".csv", ".parquet", ".npz")):
            raise ValueError("must be a .csv, .parquet or .npz file")
        return out
