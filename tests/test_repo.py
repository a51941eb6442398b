"""The repository: CI runs the README's test command as written; the code is ruff clean."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO


def quickstart_commands() -> list[str]:
    """The shell commands of the README's Quickstart block, in order."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_exactly():
    install_and_run, test = quickstart_commands()
    assert "pytest" in test and "saelab" in install_and_run
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_code_is_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
