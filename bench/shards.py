"""One hot table, 1 shard against 4 shards, flushed by 2 real worker processes.

The same backlog (``--rows`` rows of the ``realistic`` event table, appended in batches of
10,000: round-robin over the shards, or split by a ``user_id`` shard key) is built in a
redis-server of the benchmark's own, then two ``celery -A workers.app worker -c 1``
processes drain it: one ``flush_table`` per shard is sent (``Producer.flush``) and the clock
runs to the last commit the workers recorded. The variants (1 shard; 4 round-robin; 4 by
``user_id``) run interleaved, ``--repeat`` times each, on the same two workers; reported
per variant (best and median wall time; CPU of the median run):

* wall seconds and GiB (of Arrow IPC payload) flushed per second;
* CPU-seconds per GiB flushed, of the workers (every process of both worker trees, from
  ``/proc``) and of redis-server (``INFO cpu``), summed.

With one shard only one worker can hold the table's lease at a time; with four, both work.

    python -m bench.shards [--rows 8000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import machine, redis_server, start_worker
from bench.throughput import realistic
from producer import Producer, Settings, shards
from producer.client import connect

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


VARIANTS = ((1, ""), (4, ""), (4, "user_id"))


def once(client, settings: Settings, workers: list[subprocess.Popen[bytes]], lake: str,
         count: int, key: str, rows: int) -> dict[str, float]:
    """Build the backlog of one variant, drain it; its wall time and CPU."""
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
    workers_cpu, redis_cpu = _cpu_s(pids) - cpu0, _redis_cpu_s(client) - redis0
    flushed = sum(int(client.hget(k.stats, "rows") or 0) for k in keys)
    assert flushed == rows, (flushed, rows)
    producer.close()
    shutil.rmtree(lake, ignore_errors=True)
    return {"wall_s": (last_ms - started_ms) / 1000, "gib": payload / 2**30,
            "workers_cpu_s": workers_cpu, "redis_cpu_s": redis_cpu}


def run(workdir: str, url: str, rows: int, repeat: int) -> list[dict[str, float | str]]:
    """Every variant ``repeat`` times, interleaved (1, 4, 4 by key, 1, 4, ...) on the same
    two workers, so that a change of the machine's load falls on all of them alike; per
    variant the best and the median wall time, and the CPU of the median run."""
    lake = os.path.join(workdir, "lake")
    env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=lake,
               DELTAFLUSH_MAX_FILE_BYTES=str(64 * 2**20), DELTAFLUSH_MAX_PENDING_BYTES="0",
               DELTAFLUSH_FLUSH_AT_BYTES=str(2**62))  # the clock starts with the flushes
    settings = Settings.from_env(env)
    client = connect(url)
    workers = [start_worker(env, Path(workdir) / f"w{i}.log") for i in range(2)]
    runs: dict[tuple[int, str], list[dict[str, float]]] = {v: [] for v in VARIANTS}
    try:
        for _ in range(repeat):
            for count, key in VARIANTS:
                runs[(count, key)].append(once(client, settings, workers, lake, count, key,
                                               rows))
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        client.close()
    out: list[dict[str, float | str]] = []
    for (count, key), found in runs.items():
        found.sort(key=lambda r: r["wall_s"])
        median = found[len(found) // 2]
        gib = median["gib"]
        out.append({"shards": count, "shard_key": key or "-", "rows": rows,
                    "gib": round(gib, 3), "best_wall_s": round(found[0]["wall_s"], 3),
                    "median_wall_s": round(median["wall_s"], 3),
                    "median_gib_per_s": round(gib / median["wall_s"], 3),
                    "workers_cpu_s_per_gib": round(median["workers_cpu_s"] / gib, 2),
                    "redis_cpu_s_per_gib": round(median["redis_cpu_s"] / gib, 2),
                    "cpu_s_per_gib": round((median["workers_cpu_s"] + median["redis_cpu_s"])
                                           / gib, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    before = os.getloadavg()
    with redis_server() as (workdir, url):
        results = run(workdir, url, args.rows, args.repeat)
    print(json.dumps({"machine": machine(),
                      "load_average_before": [round(x, 2) for x in before],
                      "load_average_after": [round(x, 2) for x in os.getloadavg()],
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
