"""What every benchmark needs: a redis-server of its own and a record of the machine."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import redis


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


def machine() -> dict[str, str]:
    info = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "redis": info.stdout.split()[2] if info.stdout else "?",
        "platform": platform.platform(),
    }
