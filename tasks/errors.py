"""The errors a user acts on, so every entry point can report them in one line."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad data or parameters, found before training: the message names the file or field."""


class StorageError(OSError):
    """The run folder, the cache or a checkpoint could not be written (full disk, permissions);
    whatever was already there is left as it was."""


class NonFiniteLoss(RuntimeError):
    """Training diverged: the message names the epoch and batch; no bad checkpoint is kept."""

    def __init__(self, phase: str, epoch: int, batch: int):
        super().__init__(f"non-finite {phase} loss at epoch {epoch}, batch {batch}; stopping")
        self.phase, self.epoch, self.batch = phase, epoch, batch


# The errors a user acts on: said in one line.
USER_ERRORS = (InputError, NonFiniteLoss, StorageError)
UserError = InputError | NonFiniteLoss | StorageError
# Why a write fails again on the next attempt: a full disk or quota, no permission, a read-only
# file system. Any other (an I/O error, a lost connection to network storage) may pass.
LASTING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def is_final(error: BaseException) -> bool:
    """Whether another attempt would only fail the same way: bad input, a diverging loss, or a
    write refused for a lasting reason. Such errors are never retried."""
    if isinstance(error, InputError | NonFiniteLoss):
        return True
    return isinstance(error, StorageError) and getattr(error, "errno", None) in LASTING_ERRNOS


def user_error_record(error: UserError) -> dict[str, Any]:
    """`error` as JSON values, for a process that raises it again (from_record)."""
    if isinstance(error, NonFiniteLoss):
        return {"type": "NonFiniteLoss", "args": [error.phase, error.epoch, error.batch]}
    errno_ = getattr(error, "errno", None)
    return {"type": type(error).__name__, "args": [str(error)], "errno": errno_}


def from_record(record: dict[str, Any]) -> UserError:
    kinds: dict[str, type[UserError]] = {kind.__name__: kind for kind in USER_ERRORS}
    error = kinds[record["type"]](*record["args"])
    if record.get("errno") is not None:
        error.errno = record["errno"]
    return error


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable (permission denied or read-only)"
    return exc.strerror or str(exc)


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an OSError while writing `what` into a one-line StorageError naming it."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        error = StorageError(f"cannot write {what}: {_reason(exc)}")
        error.errno = exc.errno
        raise error from exc


class _OneLineForUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _OneLineForUserErrors()


def quiet_input_errors() -> None:
    """Prefect logs every failed run with a traceback; for these errors the message says it all."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
