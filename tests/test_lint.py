"""Lint and types are part of the suite: ruff over the whole tree, mypy over the package code
(``producer`` and ``workers``), with the settings in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "producer", "workers", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_package_code():
    result = _run("mypy", "producer", "workers")
    assert result.returncode == 0, result.stdout + result.stderr
