"""Take the screenshot of Flower's task page that docs/operations.md shows.

    python -m bench.flower_screenshot docs/flower-tasks.png

Starts its own redis-server, a worker and Flower (on 127.0.0.1, without auth so that the
headless browser needs no credentials), runs a few flushes, and screenshots /tasks with
Debian's chromium (apt-get install chromium).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import free_port, redis_server
from bench.throughput import realistic
from producer import Producer, Settings, wire
from workers.app import make_app


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/flower-tasks.png").resolve()
    with redis_server("deltaflush-flower-") as (workdir, url):
        env = dict(os.environ, DELTAFLUSH_REDIS_URL=url,
                   DELTAFLUSH_STORAGE_URI=f"{workdir}/lake")
        celery = [str(Path(sys.executable).with_name("celery")), "-A", "workers.app"]
        port = free_port()
        procs = [
            subprocess.Popen(celery + ["worker", "--loglevel=WARNING"], env=env),
            # its API without auth too, for the waits below (bound to 127.0.0.1 only)
            subprocess.Popen(celery + ["flower", f"--port={port}", "--address=127.0.0.1"],
                             env=dict(env, FLOWER_UNAUTHENTICATED_API="true")),
        ]
        try:
            _screenshot(out, workdir, env, port)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def _wait_for(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g}s for {what}")
        time.sleep(0.2)


def _screenshot(out: Path, workdir: str, env: dict[str, str], port: int) -> None:
    flower = f"http://127.0.0.1:{port}"
    # Flower knows the worker alive from its events: it will see the tasks too
    _wait_for(lambda: any(_get(f"{flower}/api/workers?status=1").values()),
              "Flower to see the worker")
    settings = Settings.from_env(env)
    producer = Producer(settings=settings)
    app = make_app(settings)
    results = []
    for n, table in enumerate(["page_views", "clicks", "orders", "payments"]):
        producer.append_many(table, [realistic(i * 5000, 5000) for i in range(4 + 3 * n)])
        results.append(app.send_task(wire.FLUSH_TASK, args=[table], queue=wire.QUEUE))
    for r in results:
        r.get(timeout=60)
    _wait_for(lambda: all(_get(f"{flower}/api/task/info/{r.id}").get("state") == "SUCCESS"
                          for r in results), "Flower to show the tasks as done")
    pages = [(out, "tasks", "1500,700"),
             (out.with_name(out.stem + "-detail.png"), f"task/{results[-1].id}", "1500,1100")]
    for path, page, size in pages:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={workdir}/chrome",
                        "--hide-scrollbars", "--virtual-time-budget=5000",
                        f"--window-size={size}", f"--screenshot={path}",
                        f"{flower}/{page}"],
                       check=True, capture_output=True)
        print(f"wrote {path}")
    app.close()
    producer.close()


if __name__ == "__main__":
    main()
