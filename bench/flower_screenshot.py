"""Take the screenshot of Flower's task page that docs/operations.md shows.

    python -m bench.flower_screenshot docs/flower-tasks.png

Starts its own redis-server, a worker and Flower (on 127.0.0.1, without auth so that the
headless browser needs no credentials), runs a few flushes, and screenshots /tasks with
Debian's chromium (apt-get install chromium).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import free_port, start_redis
from bench.throughput import realistic
from producer import Producer, Settings, wire
from workers.app import make_app


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/flower-tasks.png").resolve()
    workdir = tempfile.mkdtemp()
    redis_proc, url = start_redis(workdir)
    env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=f"{workdir}/lake")
    celery = [str(Path(sys.executable).with_name("celery")), "-A", "workers.app"]
    port = free_port()
    procs = [
        subprocess.Popen(celery + ["worker", "--loglevel=WARNING"], env=env),
        subprocess.Popen(celery + ["flower", f"--port={port}", "--address=127.0.0.1"],
                         env=env),
    ]
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        settings = Settings.from_env(env)
        producer = Producer(settings=settings)
        app = make_app(settings)
        results = []
        for n, table in enumerate(["page_views", "clicks", "orders", "payments"]):
            producer.append_many(table, [realistic(i * 5000, 5000) for i in range(4 + 3 * n)])
            results.append(app.send_task(wire.FLUSH_TASK, args=[table], queue=wire.QUEUE))
        for r in results:
            r.get(timeout=60)
        time.sleep(2)  # let Flower receive the task events
        pages = [(out, "tasks", "1500,700"),
                 (out.with_name(out.stem + "-detail.png"), f"task/{results[-1].id}", "1500,1100")]
        for path, page, size in pages:
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={workdir}/chrome",
                            "--hide-scrollbars", "--virtual-time-budget=5000",
                            f"--window-size={size}", f"--screenshot={path}",
                            f"http://127.0.0.1:{port}/{page}"],
                           check=True, capture_output=True)
            print(f"wrote {path}")
        app.close()
        producer.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        redis_proc.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
