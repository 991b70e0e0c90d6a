"""List and prune the stage cache: `trainflow cache list|prune [options]`."""

from __future__ import annotations

import argparse
import re
import sys
import time

from trainflow.flows.cli import OneLineParser
from trainflow.tasks.cache.prune import list_entries, prune
from trainflow.tasks.cache.store import LEFTOVER_AGE_S
from trainflow.tasks.rules import DEFAULT_CACHE_DIR

UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
}
SPANS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 10GB)")
    return int(float(match[1]) * UNITS[match[2].lower()])


def parse_age(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*([smhdw])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (e.g. 12h, 7d, 2w)")
    return float(match[1]) * SPANS[match[2]]


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def main(argv: list[str] | None = None, prog: str = "cache_cli.py") -> int:
    # No abbreviations (`--older 7d`): a flag added later would silently change their meaning.
    parser = OneLineParser(prog=prog, description=__doc__)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="folder or fsspec URL")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per entry, oldest first", allow_abbrev=False)
    pruning = commands.add_parser(
        "prune",
        help="remove leftovers of killed writes, then the oldest entries",
        allow_abbrev=False,
    )
    pruning.add_argument("--older-than", type=parse_age, help="e.g. 7d: remove entries older")
    pruning.add_argument("--max-size", type=parse_size, help="e.g. 10GB: then shrink to this")
    args = parser.parse_args(argv)

    if args.command == "list":
        entries = list_entries(args.cache_dir)
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) if e.created else "?"
            why = f"  ({e.leftover})" if e.leftover else ""
            print(f"{when}  {_human(e.size):>9}  {e.key}{why}")
        summary = (
            f"{len(entries)} entries, {_human(sum(e.size for e in entries))} in {args.cache_dir}"
        )
        if leftovers := [e for e in entries if e.leftover]:
            hours = LEFTOVER_AGE_S / 3600
            summary += (
                f"; {len(leftovers)} of them leftovers ({_human(sum(e.size for e in leftovers))}),"
                f" which any prune removes once untouched for {hours:g} h"
            )
        print(summary)
        return 0
    if args.older_than is None and args.max_size is None:
        parser.error("prune needs --older-than and/or --max-size")
    removed = prune(args.cache_dir, args.older_than, args.max_size)
    print(f"removed {len(removed)} entries, {_human(sum(e.size for e in removed))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
