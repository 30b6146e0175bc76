"""One scheduling round: which tables get a ``flush_table`` now.

Beat sends the scheduling task every second (or every ``flush_interval_s`` if shorter); a
worker runs :func:`due_tables` and enqueues one flush per table it returns (per due shard of
a sharded table: each ``flush_table`` message takes one shard, ``workers.tasks``). Whether
a table is due is decided, and ``{T}:queued`` set, by one script per table (``producer.due``), so
two rounds never both queue a flush of the same table; the scripts of all tables go out in
pipelined batches of 1,000 (on a Redis Cluster, each batch split by master: every
script runs in its table's slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis

from producer import shards, wire
from producer.due import DUE, due_args, due_keys, send_or_unmark

BATCH = 1000


def iter_tables(client: redis.Redis, prefix: str) -> Iterator[str]:
    for name in client.sscan_iter(wire.tables_key(prefix), count=BATCH):
        yield name.decode()


def due_tables(client: redis.Redis, prefix: str, queued_ttl_ms: int,
               interval_ms: int = 0) -> list[str]:
    """Mark and return the tables that need a flush now: something pending, none queued or
    running, and their flush interval (``interval_ms`` unless the table sets its own) passed
    since they were last scheduled. A sharded table is there once per due shard."""
    return [k.table for k in due_shards(client, prefix, queued_ttl_ms, interval_ms)]


def due_shards(client: redis.Redis, prefix: str, queued_ttl_ms: int,
               interval_ms: int = 0) -> list[wire.Keys]:
    """``due_tables``, as the keys of each due shard: each shard of a sharded table (every
    shard below the largest count it ever had, ``producer.shards``) is due on its own."""
    args = due_args(queued_ttl_ms, interval_ms, force=False)
    sharded = shards.sharded_tables(client, prefix)
    due: list[wire.Keys] = []
    batch: list[wire.Keys] = []

    def run(streams: list[wire.Keys]) -> None:
        hits = DUE.run_each(client, [(due_keys(k), args) for k in streams])
        due.extend(k for k, hit in zip(streams, hits, strict=True) if hit)

    for name in iter_tables(client, prefix):
        batch.extend(shards.all_shards(prefix, name, sharded))
        if len(batch) >= BATCH:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return due


def enqueue_due(
    client: redis.Redis, prefix: str, queued_ttl_ms: int, send: Callable[[str], object],
    interval_ms: int = 0,
) -> list[str]:
    """Run a round and ``send`` each due table (once per due shard); unmark a shard whose
    send failed."""
    sent = []
    for keys in due_shards(client, prefix, queued_ttl_ms, interval_ms):
        send_or_unmark(client, keys, send)
        sent.append(keys.table)
    return sent
