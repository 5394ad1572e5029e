"""The README's promises: its test command is the one CI runs, its recipe commands are valid."""
from __future__ import annotations

import re

from tests.conftest import REPO


def block(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = block(ci, "# --- README test command (begin) ---", "# --- README test command (end) ---")
    assert command and command in readme


def test_readme_launch_lines_name_existing_files():
    readme = (REPO / "README.md").read_text()
    paths = set(re.findall(r"(recipes/[\w.-]+\.yaml|accelerate_configs/[\w.-]+\.yaml)", readme))
    assert len(paths) >= 5, paths   # the pattern still finds the README's launch lines
    for path in paths:
        assert (REPO / path).is_file(), path
