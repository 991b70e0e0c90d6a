"""The README is the front door: its Quickstart is what CI runs, it stays short, its links and
the docs' links lead somewhere, and it tells no history."""

import re
from pathlib import Path

import pytest

from .conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 260

_FENCED = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_ISSUE_NUMBER = re.compile(r"(?<![\w/.&-])#\d+\b")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, …


def _quickstart_commands() -> list[str]:
    readme = README.read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return _INLINE_CODE.sub("", _FENCED.sub("", markdown))


def _relative_links(path: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(path.read_text()))
        if not _EXTERNAL.match(target) and not target.startswith("#")
    ]


def test_ci_runs_the_readme_test_command_verbatim():
    run_command, test_command = _quickstart_commands()[:2]
    assert run_command.endswith("python flows/train_flow.py")
    assert test_command.endswith("pytest")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_that_exists(path: Path):
    broken = [
        target
        for target in _relative_links(path)
        if not (path.parent / target.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"


def test_the_readme_links_into_docs():
    assert DOCS, "docs/ holds no pages"
    linked = {(REPO / t.split("#", 1)[0]).resolve() for t in _relative_links(README)}
    assert {page.resolve() for page in DOCS} <= linked, "a docs/ page the README never links"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_numbers_outside_code(path: Path):
    found = _ISSUE_NUMBER.findall(_prose(path.read_text()))
    assert not found, f"{path.relative_to(REPO)} names issues {found}: say what is, not history"


def test_the_checks_themselves_see_links_and_issue_numbers():
    text = "See [a](docs/a.md#x), [b](https://e.org), `[c](d.md)` and #12, not `#13`.\n"
    assert _LINK.findall(_prose(text)) == ["docs/a.md#x", "https://e.org"]
    assert _LINK.findall("a [wrapped\nlink](cli.md) and [0, 1] alone") == ["cli.md"]
    assert _ISSUE_NUMBER.findall(_prose(text)) == ["#12"]
    assert _ISSUE_NUMBER.findall(_prose("```\nfixed #14\n```\n")) == []
