"""One hot table, 1 shard against 4 shards, flushed by 2 real worker processes.

The same backlog (``--rows`` rows of the ``realistic`` event table, appended in batches of
10,000: round-robin over the shards, or split by a ``user_id`` shard key) is built in a
redis-server of the benchmark's own, then two ``celery -A workers.app worker -c 1``
processes drain it: one ``flush_table`` per shard is sent (``Producer.flush``) and the clock
runs to the last commit the workers recorded. Reported per shard count (best of
``--repeat`` for wall time; CPU of that same run):

* wall seconds and GiB (of Arrow IPC payload) flushed per second;
* CPU-seconds per GiB flushed, of the workers (every process of both worker trees, from
  ``/proc``) and of redis-server (``INFO cpu``), summed.

With one shard only one worker can hold the table's lease at a time; with four, both work.

    python -m bench.shards [--rows 4000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, redis_server
from bench.throughput import realistic
from producer import Producer, Settings, shards
from producer.client import connect

CELERY = [str(Path(sys.executable).with_name("celery")), "-A", "workers.app"]
TABLE = "hot"
BATCH = 10_000
TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of ``pids`` so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def _redis_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(CELERY + ["worker", "-c", "1", "-n", f"{log.stem}@%h",
                                          "--loglevel=INFO", "--without-mingle",
                                          "--without-gossip"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return proc


def run(workdir: str, url: str, count: int, rows: int, repeat: int,
        key: str = "user_id") -> dict[str, float | str]:
    lake = os.path.join(workdir, f"lake-{count}")
    env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=lake,
               DELTAFLUSH_MAX_FILE_BYTES=str(64 * 2**20), DELTAFLUSH_MAX_PENDING_BYTES="0",
               DELTAFLUSH_FLUSH_AT_BYTES=str(2**62))  # the clock starts with the flushes
    settings = Settings.from_env(env)
    client = connect(url)
    workers = [_worker(env, Path(workdir) / f"w{count}-{i}.log") for i in range(2)]
    best: dict[str, float | str] = {}
    try:
        for _ in range(repeat):
            client.flushall()
            producer = Producer(settings=settings)
            if count > 1:
                producer.configure(TABLE, shards=count, shard_key=key)
            for start in range(0, rows, BATCH * 16):
                producer.append_many(TABLE, [realistic(s, BATCH) for s in
                                             range(start, min(rows, start + BATCH * 16), BATCH)])
            keys = shards.table_shards(client, "deltaflush", TABLE)
            payload = sum(int(client.hget(k.pending, "bytes") or 0) for k in keys)
            pids = [p for w in workers for p in _tree(w.pid)]
            cpu0, redis0 = _cpu_s(pids), _redis_cpu_s(client)
            started_ms = time.time() * 1000
            producer.flush(TABLE)  # one flush_table per shard
            while any(client.xlen(k.delta) or client.exists(k.lease) for k in keys):
                time.sleep(0.01)
            last_ms = max(float(client.hget(k.stats, "last_flush_ms") or 0) for k in keys)
            wall = (last_ms - started_ms) / 1000
            workers_cpu, redis_cpu = _cpu_s(pids) - cpu0, _redis_cpu_s(client) - redis0
            gib = payload / 2**30
            flushed = sum(int(client.hget(k.stats, "rows") or 0) for k in keys)
            assert flushed == rows, (flushed, rows)
            producer.close()
            shutil.rmtree(lake, ignore_errors=True)
            if not best or wall < float(best["wall_s"]):
                best = {"shards": count, "shard_key": key if count > 1 else "-",
                        "rows": rows, "gib": round(gib, 3),
                        "wall_s": round(wall, 3), "gib_per_s": round(gib / wall, 3),
                        "workers_cpu_s_per_gib": round(workers_cpu / gib, 2),
                        "redis_cpu_s_per_gib": round(redis_cpu / gib, 2),
                        "cpu_s_per_gib": round((workers_cpu + redis_cpu) / gib, 2)}
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        client.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = []
    with redis_server() as (workdir, url):
        for count, key in ((1, ""), (4, ""), (4, "user_id")):
            results.append(run(workdir, url, count, args.rows, args.repeat, key))
    load = os.getloadavg()
    print(json.dumps({"machine": machine(), "load_average": [round(x, 2) for x in load],
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
