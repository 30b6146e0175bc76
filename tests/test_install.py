"""A production install, as a user or the Docker image makes it, runs the whole pipeline.

The suite's own environment has the ``[test]`` extra, which brings in packages the runtime
may import without declaring (kombu 5.7's Redis transport imports ``packaging``; only pytest
brought it in, so no test saw the worker die at start). These tests build fresh virtual
environments from a fresh copy of the repository instead:

* ``pip install .`` with no extras, then a real ``celery -A workers.app worker`` from it on
  the default broker (Redis) and on RabbitMQ, landing a flush; and ``deltaflush demo``;
* the Dockerfile's own ``pip install`` line, in a folder holding only what the Dockerfile
  copies, then every module the worker imports, the lazily imported ones included.

pip's cache is used (the Dockerfile's ``--no-cache-dir`` is dropped here), so after the
first run an environment takes seconds, not a download.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import ROOT, RedisServer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Every module of the package, and the ones Celery and kombu import only once a worker
#: connects (the broker transports, the result backend, the beat scheduler).
IMPORT_EVERYTHING = """
import importlib, pkgutil
import producer, workers
for package in (producer, workers):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
from celery.utils.imports import symbol_by_name
from kombu import Connection
from workers.app import app
app.connection_for_write().transport      # the default broker's transport (Redis)
Connection("amqp://guest@127.0.0.1//").transport   # RabbitMQ's
app.backend                                # the result backend
symbol_by_name(app.conf.beat_scheduler)    # RedBeat
print("imported everything")
"""


def _env(**extra: str) -> dict[str, str]:
    """The environment of a process of the installed package: nothing of this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DELTAFLUSH_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_ROOT_USER_ACTION="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def fresh_copy(dest: Path) -> Path:
    """The files a clone of this checkout would have (tracked, or new and not ignored)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
        check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


def pip(bin_dir: Path, args: list[str], cwd: Path) -> None:
    proc = subprocess.run([str(bin_dir / "pip"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def prod_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` of a fresh copy, no extras: the bin folder of that environment."""
    base = tmp_path_factory.mktemp("prod")
    clone = fresh_copy(base / "clone")
    bin_dir = make_venv(base / "venv")
    pip(bin_dir, ["install", "-q", "."], cwd=clone)
    shutil.rmtree(clone)  # the worker must not find the sources anywhere
    return bin_dir


def dockerfile_install(text: str) -> tuple[list[str], list[str]]:
    """The Dockerfile's ``COPY`` sources and its ``pip install`` arguments."""
    copies = [src for line in re.findall(r"^COPY (.+)$", text, re.M)
              for src in shlex.split(line)[:-1]]
    run = " ".join(line.strip().rstrip("\\") for line in
                   re.search(r"^RUN (.+?)(?<!\\)$", text, re.M | re.S).group(1).splitlines())
    install = next(cmd for cmd in run.split("&&") if cmd.split()[:2] == ["pip", "install"])
    return copies, shlex.split(install)[2:]


def test_dockerfile_install_brings_in_everything_the_worker_imports(tmp_path):
    copies, args = dockerfile_install((ROOT / "Dockerfile").read_text())
    assert "." in " ".join(args), "the image installs the package itself"
    context = tmp_path / "context"  # only what the image copies
    for src in copies:
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, context / src,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, context / src)
    bin_dir = make_venv(tmp_path / "venv")
    pip(bin_dir, ["install", "-q", *(a for a in args if a != "--no-cache-dir")], cwd=context)
    proc = subprocess.run([str(bin_dir / "python"), "-c", IMPORT_EVERYTHING], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported everything" in proc.stdout


def test_production_install_imports_everything(prod_bin, tmp_path):
    proc = subprocess.run([str(prod_bin / "python"), "-c", IMPORT_EVERYTHING], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


PRODUCE = """
from producer import Producer
p = Producer()
p.append("events", [{"id": i, "name": f"row {i}"} for i in range(100)])
assert p.flush("events"), "a flush was already queued"
p.close()
"""


def land_a_flush(bin_dir: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """A real worker from ``bin_dir``, a producer from the same environment; the rows of one
    flush readable in Parquet."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(bin_dir / "celery"), "-A", "workers.app", "worker", "-c", "1",
             "--loglevel=INFO", "--without-mingle", "--without-gossip",
             "-n", f"prod-{uuid.uuid4().hex[:6]}@%h"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b" ready." in log.read_bytes() or worker.poll() is not None, 60,
                 "the worker to start")
        assert worker.poll() is None, log.read_text()
        proc = subprocess.run([str(bin_dir / "python"), "-c", PRODUCE], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = Path(env["DELTAFLUSH_STORAGE_URI"]) / "events"
        wait_for(lambda: list(table.glob("*.parquet")), 60, "the flush to land")
        ids = ds.dataset(str(table)).to_table(columns=["id"])["id"].to_pylist()
        assert sorted(ids) == list(range(100))
        # `deltaflush sql` is part of the CLI the package alone runs (DuckDB comes with it)
        sql = subprocess.run([str(bin_dir / "deltaflush"), "sql", "--json",
                              "SELECT count(*) AS n FROM events"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert sql.returncode == 0, sql.stdout + sql.stderr
        assert "100" in sql.stdout, sql.stdout
    finally:
        worker.terminate()
        worker.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_production_install_lands_a_flush_on_the_default_broker(prod_bin, own_redis, tmp_path):
    env = _env(DELTAFLUSH_REDIS_URL=own_redis.url,
               DELTAFLUSH_STORAGE_URI=str(tmp_path / "lake"))
    land_a_flush(prod_bin, tmp_path, env)


def test_production_install_lands_a_flush_on_rabbitmq(prod_bin, own_redis, rabbitmq_vhost,
                                                      tmp_path):
    env = _env(DELTAFLUSH_REDIS_URL=own_redis.url, DELTAFLUSH_BROKER_URL=rabbitmq_vhost,
               DELTAFLUSH_STORAGE_URI=str(tmp_path / "lake"))
    land_a_flush(prod_bin, tmp_path, env)


def test_dockerfile_parsing_finds_the_install_line():
    copies, args = dockerfile_install(
        "COPY a b ./\nRUN pip install --no-cache-dir '.[flower]' \\\n    && useradd x\n")
    assert copies == ["a", "b"] and args == ["--no-cache-dir", ".[flower]"]


def test_the_demo_runs_from_a_production_install(prod_bin, tmp_path):
    """The README's path without make: the package alone, then `deltaflush demo`; its
    reading commands use what the package installs (pyarrow and DuckDB), not polars, and
    each of them runs there (check_demo_output runs them)."""
    from tests.test_cli import check_demo_output, run_demo

    env = _env()
    out = run_demo(str(prod_bin / "deltaflush"), tmp_path, env)
    assert "import duckdb" in out and "import polars" not in out
    check_demo_output(out, tmp_path, env)


def test_doctor_from_a_production_install(prod_bin, own_redis, rabbitmq_vhost, tmp_path):
    env = _env(DELTAFLUSH_REDIS_URL=own_redis.url, DELTAFLUSH_BROKER_URL=rabbitmq_vhost,
               DELTAFLUSH_STORAGE_URI=str(tmp_path / "lake"))
    proc = subprocess.run([str(prod_bin / "deltaflush"), "doctor"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broker             ok" in proc.stdout
