"""What ``DELTAFLUSH_APPEND_REPLICAS`` costs an append on a Redis Cluster.

One table on a local Redis Cluster (3 masters with a replica each, tests/cluster.py), the
same batches appended with ``append_replicas`` 0 and 1: one ``append`` at a time (latency
per batch, p50 and p99) and ``append_many`` in groups (throughput).

    python -m bench.replicas [--batches 2000] [--rows 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyarrow as pa

from bench.common import machine
from bench.scheduling import local_cluster
from producer import Producer, Settings


def batch(start: int, rows: int) -> pa.Table:
    ids = pa.array(range(start, start + rows), pa.int64())
    return pa.table({"id": ids, "user": pa.array([f"u{i % 977}" for i in range(rows)]),
                     "value": pa.array([float(i) for i in range(rows)])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    batches = [batch(i * args.rows, args.rows) for i in range(args.batches)]
    size = sum(b.nbytes for b in batches) / 2**20
    rows = []
    with local_cluster() as (_, url):
        for replicas in (0, 1, 0, 1):  # alternating, so that drift hits both alike
            settings = Settings(redis_url=url, broker_url="amqp://unused",
                                key_prefix=f"r{replicas}{len(rows)}", append_replicas=replicas,
                                max_pending_bytes=0, flush_at_bytes=1 << 40)
            with Producer(settings=settings) as p:
                p.append("warm", batches[0])
                took = []
                for b in batches:
                    started = time.perf_counter()
                    p.append("events", b)
                    took.append(time.perf_counter() - started)
                started = time.perf_counter()
                p.append_many("many", batches)
                many_s = time.perf_counter() - started
            took.sort()
            rows.append((replicas, statistics.median(took) * 1000,
                         took[int(len(took) * 0.99)] * 1000, len(took) / sum(took),
                         size / many_s))
    print(f"machine: {json.dumps(machine())}")
    print(f"{args.batches} batches of {args.rows} rows ({size:.1f} MiB of Arrow data)")
    print("| append_replicas | append p50 | append p99 | appends/s (one at a time) | "
          "append_many MiB/s |")
    print("| --- | --- | --- | --- | --- |")
    for replicas, p50, p99, rate, many in rows:
        print(f"| {replicas} | {p50:.2f} ms | {p99:.2f} ms | {rate:,.0f} | {many:,.0f} |")


if __name__ == "__main__":
    main()
