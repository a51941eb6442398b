"""The repository: CI runs the README's test command as written; the code is ruff clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from helpers import REPO


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
    proc = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "examples"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def markdown_files() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_points_to_a_file_or_heading():
    for page in markdown_files():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: broken link {target}"
            if anchor and file.suffix == ".md":
                headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                            for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in headings, f"{page.name}: no heading #{anchor} in {path}"


def test_the_docs_hold_measured_numbers_only():
    """No placeholder left where a measured number belongs."""
    for page in markdown_files():
        for marker in ("TIMING_", "CPU-BENCH", "LABEL_CURVE_SUMMARY", "TODO", "TBD"):
            assert marker not in page.read_text(), f"{page.name}: {marker}"


def test_the_readme_stays_the_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 210


def test_every_measured_number_in_the_docs_is_rendered_from_its_run():
    """The README's and docs' generated blocks hold what docs/measured.json recorded, so no two
    pages quote one run differently (regenerate: python benchmarks/measured.py render)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("measured", REPO / "benchmarks" / "measured.py")
    measured = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measured)
    assert measured.render(check=True) == []
    generated = measured.blocks(json.loads((REPO / "docs" / "measured.json").read_text()))
    for page in markdown_files():
        for name in re.findall(r"<!-- measured:(\S+) -->", page.read_text()):
            assert name in generated, f"{page.name}: block {name} has no recorded run"
