"""What every benchmark needs: a redis-server of its own, real worker processes and a record
of the machine."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import redis

from producer import Producer, Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server without persistence on a free port; return it and its URL."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(250):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    # the server answering must be ours (the port may have been taken since it was free)
    if client.info("server")["process_id"] != proc.pid:
        proc.kill()
        raise RuntimeError(f"port {port} is answered by another redis-server")
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


@contextmanager
def redis_server(prefix: str = "deltaflush-bench-") -> Iterator[tuple[str, str]]:
    """A scratch folder with a redis-server of its own: yields ``(folder, URL)``; the server
    is stopped and the folder removed afterwards."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    proc, url = start_redis(workdir)
    try:
        yield workdir, url
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def backlog(client: redis.Redis, settings: Settings, table: str, tables: list[pa.Table]) -> None:
    """An emptied Redis (FLUSHALL through ``client``), then ``tables`` appended to ``table``
    by a producer of ``settings``, 64 batches an ``append_many``: a backlog to flush."""
    client.flushall()
    producer = Producer(settings=settings)
    for i in range(0, len(tables), 64):
        producer.append_many(table, tables[i:i + 64])
    producer.close()


#: The plain command users run: ``celery -A workers.app``.
CELERY = [str(Path(sys.executable).with_name("celery")), "-A", "workers.app"]


def start_worker(env: dict[str, str], log: Path, concurrency: int = 1) -> subprocess.Popen[bytes]:
    """A ``celery -A workers.app worker`` of ``concurrency`` processes named after ``log``'s
    stem, logging to ``log``; returned once it says it is ready (RuntimeError with its log if
    it exits or is not ready within 60 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(CELERY + ["worker", "-c", str(concurrency), "-n",
                                          f"{log.stem}@%h", "--loglevel=INFO",
                                          "--without-mingle", "--without-gossip"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return proc


def machine() -> dict[str, str]:
    info = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "redis": info.stdout.split()[2] if info.stdout else "?",
        "platform": platform.platform(),
    }
