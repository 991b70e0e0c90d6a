"""The machine's load, printed beside every ratio the benchmarks report.

A ratio taken while other work runs on the machine says more about that work than about the
code measured, so each section records the load average (`os.getloadavg()`) before and after
it, with the CPU count (`os.cpu_count()`). The benchmark's own processes count in the "after"
figure; the "before" one says whether the machine was quiet when the section started.
"""

from __future__ import annotations

import os

Load = tuple[float, float, float]  # 1-, 5- and 15-minute averages


def load() -> Load:
    return os.getloadavg()


def cpus() -> int:
    return os.cpu_count() or 1


def span(before: Load, after: Load) -> str:
    """The 1-minute load average before and after, and the CPU count: '0.52→1.73 /2'."""
    return f"{before[0]:.2f}→{after[0]:.2f} /{cpus()}"


def describe(when: str, value: Load) -> str:
    one, five, fifteen = value
    return f"load {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {cpus()} CPUs"
