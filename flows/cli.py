"""A command line generated from a pydantic model: flag --batch-size ↔ field batch_size."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal, NoReturn, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from trainflow.tasks.errors import InputError
from trainflow.tasks.project import registry

M = TypeVar("M", bound=BaseModel)


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        # No abbreviations: `--ep 3` for `--epochs` would change meaning the day another flag
        # starting with `--ep` is added.
        super().__init__(**{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; one line naming the flag is clearer.
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)
    for name, field in model.model_fields.items():
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,  # unset flags fall back to the model's own defaults
            "help": f"{field.description} (default: {_show(field.default)})",
        }
        if field.annotation is bool:
            # A switch that is off by default reads best as a bare flag: --no-cache.
            kwargs["action"] = (
                "store_true" if field.default is False else argparse.BooleanOptionalAction
            )
        elif get_origin(field.annotation) is Literal:
            kwargs["choices"] = get_args(field.annotation)
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag(name), **kwargs)
    return parser


def plain_message(error: dict[str, Any]) -> str:
    """pydantic's message for one error, without the "Value error, " it puts before the text
    of a ValueError raised by a validator (the rule is the message; the class is noise)."""
    message = error["msg"].removeprefix("Value error, ")
    return message[0].lower() + message[1:] if message else message


def describe(error: ValidationError) -> str:
    """The first problem as 'FLAG: rule (got VALUE)'."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    got = first.get("input")
    message = plain_message(first)
    shown = f" (got {got!r})" if isinstance(got, str | int | float) else ""
    if not field:  # a rule across fields: its message names the flags itself
        return message
    return f"{flag(field)}: {message}{shown}"


def parse_config(model: type[M], argv: list[str] | None = None, prog: str | None = None) -> M:
    """Parse argv into a validated model; bad input exits 2 with one line naming the flag."""
    parser = build_parser(model, prog or sys.argv[0], (model.__doc__ or "").strip())
    try:
        # The choices list the project's names only if its registry reads: if it doesn't,
        # that, not an "invalid choice", is what the user must hear.
        registry()
    except InputError as exc:
        parser.error(str(exc))
    values = vars(parser.parse_args(argv))
    try:
        return model(**values)
    except ValidationError as exc:
        parser.error(describe(exc))
