"""The training pipeline as one Prefect flow: six stages, top to bottom."""

# No `from __future__ import annotations` in flow modules: a flow shipped to a Dask or Ray
# worker is pickled by value, and its parameter types must travel as objects, not names.

import sys

if __name__ == "__main__":
    # Before the heavy imports below: validate the flags (a bad one exits 2 right away), then
    # find the Prefect server, so one that must start boots on the other core while torch loads.
    from trainflow.flows.cli import parse_config
    from trainflow.flows.config import TrainConfig
    from trainflow.flows.session import runtime

    parse_config(TrainConfig, sys.argv[1:], prog="train_flow.py")
    runtime.start_early()

from prefect.transactions import transaction
from prefect.utilities.annotations import opaque

from trainflow.flows.cli import parse_config
from trainflow.flows.config import TrainConfig
from trainflow.flows.parameters import config_flow
from trainflow.flows.session.final import user_errors_are_final
from trainflow.flows.session.runtime import command_line_run, exit_process, fail, run_url
from trainflow.flows.session.server import ServerError
from trainflow.tasks.build_loaders import build_loaders
from trainflow.tasks.build_model import build_model
from trainflow.tasks.data.tensors import training_categories
from trainflow.tasks.engine.losses import n_classes, output_width
from trainflow.tasks.engine.stops import Interrupted
from trainflow.tasks.errors import InputError, NonFiniteLoss, StorageError, quiet_input_errors
from trainflow.tasks.export_graph import export_graph
from trainflow.tasks.load_tensors import load_tensors
from trainflow.tasks.runs.folder import RunSummary, open_run
from trainflow.tasks.split import split
from trainflow.tasks.train_epochs import train_epochs


# Scheduled and UI-started runs retry a failed flow (cached stages and checkpoints make a retry
# cheap); the CLI turns this off so bad input fails at once. A crashed process is not an
# exception: deployments/ installs the automations that bring those runs back.
@config_flow(name="train", retries=2, retry_delay_seconds=30)
def train_flow(config: TrainConfig = TrainConfig()) -> RunSummary:  # noqa: B008
    cfg = config
    defaults = TrainConfig().model_dump(mode="json")
    with user_errors_are_final(), open_run(cfg.model_dump(mode="json"), defaults) as run:
        # All or nothing: input that a later stage rejects leaves no cache entry behind.
        with transaction():
            data = load_tensors(
                source=cfg.data,
                target=cfg.target,
                features=cfg.features,
                n_samples=cfg.n_samples,
                data_seed=cfg.data_seed,
                noise=cfg.noise,
                identity=cfg.data_identity,
                image_size=cfg.image_size,
            )
            parts = split(
                n_rows=len(data),
                val_fraction=cfg.val_fraction,
                seed=cfg.split_seed,
                source=cfg.data,
            )
            # A text column's vocabulary is the training rows' (README, "Categorical columns").
            data = training_categories(data=data, train=parts.train)
            loaders = build_loaders(
                data=data,
                parts=parts,
                batch_size=cfg.batch_size,
                shuffle_seed=cfg.shuffle_seed,
                kind=cfg.loader,
                num_workers=cfg.num_workers,
                device=cfg.device,
            )
            initial = build_model(
                name=cfg.model,
                n_inputs=data.n_features,
                input_shape=data.input_shape,
                input_dtype=data.input_dtype,
                categories=data.category_slots,
                n_outputs=output_width(cfg.loss, data.y, source=cfg.data),
                n_classes=n_classes(data.y),
                hidden=cfg.hidden,
                activation=cfg.activation,
                seed=cfg.init_seed,
                standardize=cfg.standardize,
                data=data,
                parts=parts,
            )
        trained = train_epochs(
            initial=initial,
            loaders=loaders,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            loss=cfg.loss,
            epochs=cfg.epochs,
            device=cfg.device,
            run_dir=run.create(),
            checkpointing=run.checkpointing(),
            options=cfg.training_options,
            launch=cfg.launch,
        )
        export_graph(
            # Its DAG edge, without Prefect walking every epoch's losses (≈ 0.1 ms an epoch).
            trained=opaque(trained),
            parts=parts,
            sample=loaders.sample,
            run_dir=run.path,
            config=run.config,
            columns=data.columns,
            cache=run.cache_url,
        )
    return run.summary()


def main(argv: list[str] | None = None, prog: str = "train_flow.py") -> int:
    config = parse_config(TrainConfig, argv, prog=prog)
    quiet_input_errors()
    url = None
    try:
        with command_line_run():
            state = train_flow.with_options(retries=0)(config, return_state=True)
            url = run_url(state)
            summary = state.result()  # the run's own error, if it failed
    except ServerError as exc:
        return fail(f"{prog}: error: {exc}", 1, url)
    except InputError as exc:
        return fail(f"{prog}: error: {exc}", 2, url)
    except (StorageError, NonFiniteLoss) as exc:
        return fail(f"{prog}: error: {exc}", 1, url)
    except Interrupted as exc:
        # The message says what was saved, if anything.
        return fail(f"{prog}: {exc}", 128 + exc.signum, url)
    print(
        f"{summary.stage_table()}\n\n"
        f"done: {summary.epochs} epochs ({summary.epochs_trained} trained in this run), "
        f"training loss {summary.final_train_loss:.6f}, "
        f"validation loss {summary.final_val_loss:.6f}\n"
        f"run directory: {summary.run_dir}\n"
        f"tensorboard --logdir {summary.run_dir}\n"
        f"Prefect UI: {url}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    exit_process(main())
