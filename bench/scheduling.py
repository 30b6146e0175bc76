"""Cost of one scheduling round with many registered tables, few of them with data.

    python -m bench.scheduling [--tables 10000] [--with-data 100] [--cluster]

``--cluster`` runs it on a local 6-node Redis Cluster (3 masters with a replica each,
tests/cluster.py), the tables spread over its masters by their hash tags.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import machine, redis_server
from producer import Producer, Settings, wire
from producer.client import connect
from workers.scheduler import due_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--with-data", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cluster", action="store_true",
                        help="on a local Redis Cluster of 3 masters (and 3 replicas)")
    args = parser.parse_args()
    with (local_cluster() if args.cluster else redis_server()) as (_, url):
        client = connect(url)
        pipe = client.pipeline(transaction=False)
        for i in range(args.tables):
            pipe.sadd(wire.tables_key("deltaflush"), f"t{i}")
        pipe.execute()
        p = Producer(settings=Settings(redis_url=url, broker_url="amqp://unused"))
        step = max(1, args.tables // max(1, args.with_data))
        busy = [f"t{i}" for i in range(0, args.tables, step)][: args.with_data]
        for name in busy:
            p.append(name, [{"id": 1}])
        best = float("inf")
        for _ in range(args.repeat):
            for name in busy:
                client.delete(wire.Keys("deltaflush", name).queued)
            started = time.perf_counter()
            due = due_tables(client, "deltaflush", 30_000)
            best = min(best, time.perf_counter() - started)
            assert len(due) == len(busy), (len(due), len(busy))
        print(f"machine: {json.dumps(machine())}")
        where = "Redis Cluster, 3 masters" if args.cluster else "one Redis"
        print(f"| Redis | tables | with data | one round (best of {args.repeat}) |")
        print("| --- | --- | --- | --- |")
        print(f"| {where} | {args.tables} | {len(busy)} | {best * 1000:.1f} ms |")


@contextmanager
def local_cluster() -> Iterator[tuple[str, str]]:
    """A local 6-node Redis Cluster in a scratch folder: yields ``(folder, URL of a node)``."""
    from tests.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="deltaflush-bench-cluster-") as folder:
        cluster = LocalCluster(Path(folder)).start()
        try:
            yield folder, cluster.url
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
