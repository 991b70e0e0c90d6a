"""Batch prediction as one Prefect flow: find a trained run's model, score a table, write it."""

# No `from __future__ import annotations` in flow modules (see train_flow.py).

import sys
import time

if __name__ == "__main__":
    # Validate the flags before the heavy imports (a bad one exits 2 right away), then find
    # the Prefect server, so one that must start boots while torch loads (see train_flow.py).
    from trainflow.flows.cli import parse_config
    from trainflow.flows.config import PredictConfig
    from trainflow.flows.session import runtime

    parse_config(PredictConfig, sys.argv[1:], prog="predict_flow.py")
    runtime.start_early()

from prefect import flow
from prefect.transactions import transaction

from trainflow.flows.cli import parse_config
from trainflow.flows.config import PredictConfig
from trainflow.flows.session.final import user_errors_are_final
from trainflow.flows.session.runtime import command_line_run, fail, run_url
from trainflow.flows.session.server import ServerError
from trainflow.tasks.errors import InputError, StorageError, quiet_input_errors
from trainflow.tasks.predict import (
    PredictSummary,
    find_model,
    output_url,
    publish,
    score,
    scoring_cache,
    stage_log,
    write_predictions,
)


@flow(name="predict", retries=1, retry_delay_seconds=10)
def predict_flow(config: PredictConfig = PredictConfig()) -> PredictSummary:  # noqa: B008
    cfg = config
    started = time.perf_counter()
    with user_errors_are_final(), stage_log() as stages:
        run = find_model(model=cfg.model, runs_dir=cfg.runs_dir)
        out = output_url(run, cfg.out)  # refused here, before scoring, if it can't be kept
        # All or nothing: an output that can't be written leaves no cache entry behind.
        with scoring_cache(cfg.cache_dir, run, cfg.no_cache, cfg.refresh_cache), transaction():
            scores = score(
                run=run,
                source=cfg.data,
                identity=cfg.data_identity,
                batch_size=cfg.batch_size,
                device=cfg.device,
            )
            write_predictions(scores=scores, run=run, out=out)
    seconds = time.perf_counter() - started
    publish(scores, run, out, seconds)
    return PredictSummary(len(scores), run.folder, out, scores.metrics, seconds, stages)


def main(argv: list[str] | None = None, prog: str = "predict_flow.py") -> int:
    config = parse_config(PredictConfig, argv, prog=prog)
    quiet_input_errors()
    url = None
    try:
        with command_line_run():
            state = predict_flow.with_options(retries=0)(config, return_state=True)
            url = run_url(state)
            summary = state.result()  # the run's own error, if it failed
    except InputError as exc:
        return fail(f"{prog}: error: {exc}", 2, url)
    except (ServerError, StorageError) as exc:
        return fail(f"{prog}: error: {exc}", 1, url)
    metrics = ", ".join(f"{name} {value:.6g}" for name, value in summary.metrics.items())
    print(
        f"{summary.stage_table()}\n\n"
        f"scored {summary.rows:,} rows in {summary.seconds:.2f} s with {summary.run_dir}"
        + (f"\nmetrics: {metrics}" if metrics else "")
        + f"\npredictions: {summary.out}\nPrefect UI: {url}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
