"""Packaging rules that are cheap to check on every run (the rest is
tools/check_release.py, which `nox` runs from .ci/run)."""

import importlib.metadata
import re
from pathlib import Path

import pytest

import fastpool

ROOT = Path(__file__).resolve().parent.parent


def test_installed_metadata_has_the_one_version():
    assert importlib.metadata.version("fastpool") == fastpool.__version__


def test_ci_runs_exactly_the_readme_test_command():
    ci, readme = ROOT / ".ci" / "run", ROOT / "README.md"
    if not ci.exists():
        pytest.skip("not a checkout (an unpacked sdist has no .ci/run)")
    command = ci.read_text(encoding="utf-8").strip().splitlines()[-1]
    assert "python3 -m venv .venv" in command and "-m pytest" in command, command
    assert f"\n    {command}\n" in readme.read_text(encoding="utf-8"), (
        "README.md's test command and the last line of .ci/run must be the same line")


def test_changelog_has_a_section_for_the_version():
    changelog = ROOT / "CHANGELOG.md"
    heading = re.compile(rf"^## \[?{re.escape(fastpool.__version__)}\]?(\s|$)", re.MULTILINE)
    assert heading.search(changelog.read_text(encoding="utf-8")), (
        f"CHANGELOG.md needs a '## {fastpool.__version__}' section")
