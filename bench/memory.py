"""Peak memory of one flush against the size of the backlog.

Starts its own redis-server, appends a backlog of 1x, 5x and 10x ``DELTAFLUSH_MAX_FILE_BYTES``
of Arrow data, then flushes it in a fresh process and reports that process's peak RSS (VmHWM) and
its throughput. The claim under test: memory is bounded by the file size target, not by the
backlog.

    python -m bench.memory [--target-mib 32] [--multiples 1,5,10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import redis

from bench.common import machine, redis_server


def batch(start: int, rows: int) -> pa.Table:
    ids = pa.array(range(start, start + rows), pa.int64())
    return pa.table({
        "ts": pa.array(range(start, start + rows), pa.timestamp("us", tz="UTC")),
        "id": ids,
        "user_id": pc.bit_wise_and(ids, pa.scalar(0xFFFF, pa.int64())),
        "name": pa.array([f"user-{i % 9973}-event" for i in range(start, start + rows)]),
        "value": pc.multiply(pc.cast(ids, pa.float64()), 1.5),
        "score": pc.cast(pc.bit_wise_and(ids, pa.scalar(1023, pa.int64())), pa.float32()),
    })


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc (``VmHWM``: peak RSS since exec; unlike
    ``getrusage``'s ``ru_maxrss`` it does not include the parent's RSS before the fork)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def flush_child(url: str, storage: str, target: int) -> None:
    """Run in a fresh process: flush the table, print JSON with peak RSS and timing."""
    from producer import Settings
    from producer.client import connect
    from workers.flusher import Flusher
    from workers.storage import Storage

    settings = Settings(redis_url=url, storage_uri=storage, max_file_bytes=target)
    baseline = _status_kib("VmHWM")
    started = time.perf_counter()
    result = Flusher(connect(url), Storage(storage), settings).flush("bench")
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    print(json.dumps({"rows": result.rows, "files": result.files,
                      "arrow_bytes": result.arrow_bytes, "seconds": seconds,
                      "peak_rss_kib": peak, "baseline_rss_kib": baseline}))


def run(target_mib: int, multiples: list[int]) -> list[dict[str, float]]:
    from producer import Producer, Settings

    target = target_mib * 1024 * 1024
    rows = []
    with redis_server() as (workdir, url):
        client = redis.Redis.from_url(url)
        for m in multiples:
            client.flushall()
            storage = os.path.join(workdir, f"lake-{m}")
            producer = Producer(settings=Settings(redis_url=url, max_pending_bytes=0))
            one = batch(0, 20_000)
            per_batch = one.nbytes
            n = (m * target) // per_batch + 1
            for i in range(0, n, 16):
                producer.append_many("bench", [batch((i + k) * 20_000, 20_000)
                                               for k in range(min(16, n - i))])
            producer.close()
            out = subprocess.run(
                [sys.executable, "-m", "bench.memory", "--child", url, storage, str(target)],
                capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            rows.append({
                "multiple": m,
                "backlog_mib": round(n * per_batch / 2**20),
                "files": r["files"],
                "peak_rss_mib": round(r["peak_rss_kib"] / 1024),
                "baseline_rss_mib": round(r["baseline_rss_kib"] / 1024),
                "flush_mib_s": round(r["arrow_bytes"] / 2**20 / r["seconds"], 1),
                "rows_s": round(r["rows"] / r["seconds"]),
            })
            shutil.rmtree(storage, ignore_errors=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        flush_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-mib", type=int, default=32)
    parser.add_argument("--multiples", default="1,5,10")
    args = parser.parse_args()
    rows = run(args.target_mib, [int(x) for x in args.multiples.split(",")])
    print(f"machine: {json.dumps(machine())}")
    print(f"file size target: {args.target_mib} MiB\n")
    print("| backlog (x target) | backlog MiB | files | peak RSS MiB | RSS before flush MiB "
          "| flush MiB/s | rows/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['multiple']}x | {r['backlog_mib']} | {r['files']} | {r['peak_rss_mib']} "
              f"| {r['baseline_rss_mib']} | {r['flush_mib_s']} | {r['rows_s']} |")


if __name__ == "__main__":
    main()
