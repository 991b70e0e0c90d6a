"""The one error type for bad user input, so every entry point can print it as one line."""

import logging


class InputError(ValueError):
    """Bad data or parameters, found before training: the message names the file or field."""


class _InputErrorWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_errors() -> None:
    """Prefect logs every failed run with a traceback; for bad input the message says it all."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_InputErrorWithoutTraceback())
