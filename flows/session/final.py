"""A user error ends its flow run for good.

A run from a deployment or the UI retries its failed flow (`@flow(retries=…)`: a transient
fault gets another attempt). Bad input, a diverging loss and a folder that can't be written
for a lasting reason (a full disk, no permission) would fail the same way again, and
Prefect's flows take no retry condition: the server decides, from the run's retry policy,
when the run proposes Failed. So the run sets that policy's retries to 0 first
(`update_flow_run`, the client's public call), and its Failed state is final.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from trainflow.tasks.errors import is_final


@contextmanager
def user_errors_are_final() -> Iterator[None]:
    """Around a flow's body: a user error raised in it that another attempt would only repeat
    (`is_final`) is not retried."""
    try:
        yield
    except Exception as error:
        if is_final(error):
            _no_more_retries()
        raise


def _no_more_retries() -> None:
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None or not run.empirical_policy.retries:
        return
    policy = run.empirical_policy.model_copy(update={"retries": 0})
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, empirical_policy=policy)
    except Exception as exc:  # whatever it was, the run's own error is what it reports
        get_run_logger().warning(f"could not stop this run's retries: {exc}")
