"""Every version pyproject.toml admits at its low end is one CI installs and tests.

A lower bound is a promise that the code works there. Testing a second, minimum-versions
environment would mean a second multi-GB torch download (PyPI's Linux torch is the CUDA
build) on CI's 2 cores; instead the floors are the pins of constraints.txt, which is what
CI installs, and these tests fail the day the two drift apart or the pins aren't installed.
"""

import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import REPO


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def _floor(requirement: Requirement) -> str:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: give exactly one lower bound (>=)"
    return floors[0]


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_every_lower_bound_is_the_version_ci_pins(requirement):
    pinned = _pins().get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{requirement.name} is not pinned in constraints.txt"
    assert _floor(requirement) == pinned, (
        f"pyproject.toml says {requirement}, constraints.txt pins {pinned}: CI tests only the pin"
    )
    assert pinned in requirement.specifier  # and the pin is inside any upper bound


@pytest.mark.parametrize("name", sorted(_pins()))
def test_the_pinned_versions_are_the_ones_installed(name):
    # What makes the floors tested: this environment (CI's) runs exactly the pins.
    assert Version(version(name)).public == _pins()[name]


def test_torch_is_past_the_weights_only_code_execution_hole():
    # CVE-2025-32434: torch.load(weights_only=True) could run code before torch 2.6, and
    # .pt/.pth data files are read with it.
    [torch] = [r for r in _requirements() if r.name == "torch"]
    assert Version(_floor(torch)) >= Version("2.6")
