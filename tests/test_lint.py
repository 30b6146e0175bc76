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


def test_the_worker_and_the_producer_stay_light_to_import():
    """A worker process imports the flush path only: no pandas (``pyarrow.dataset`` pulls it
    in when installed, +40 MiB of resident memory in every pool process), no lake or query
    library until a table of that format is flushed, and ``producer`` never imports
    ``workers``."""
    code = ("import sys, workers.app, workers.tasks, workers.flusher, producer;"
            "print(' '.join(m for m in ('pandas', 'pyarrow.dataset', 'pyiceberg', 'deltalake',"
            " 'duckdb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    code = ("import sys, producer, producer.client;"
            "print(any(m.startswith('workers') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
