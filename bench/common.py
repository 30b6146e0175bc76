"""What every benchmark needs: a redis-server of its own and a record of the machine."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time

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


def machine() -> dict[str, str]:
    info = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "redis": info.stdout.split()[2] if info.stdout else "?",
        "platform": platform.platform(),
    }
