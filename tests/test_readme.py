"""The README's Quickstart is what CI runs: keep the two from drifting apart."""

import re

from .conftest import REPO


def _quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_ci_runs_the_readme_test_command_verbatim():
    run_command, test_command = _quickstart_commands()[:2]
    assert run_command.endswith("python flows/train_flow.py")
    assert test_command.endswith("pytest")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
