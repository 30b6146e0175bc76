"""One scheduling round: which tables get a ``flush_table`` now.

Beat sends the scheduling task every second (or every ``flush_interval_s`` if shorter); a
worker runs :func:`due_tables` and enqueues one flush per table it returns. Whether a table
is due is decided, and ``{T}:queued`` set, by one script per table (``producer.due``), so
two rounds never both queue a flush of the same table; the scripts of all tables go out in
pipelined batches of 1,000 (on a Redis Cluster, each batch split by master: every
script runs in its table's slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis

from producer import wire
from producer.due import DUE, due_args, due_keys, send_or_unmark

BATCH = 1000


def iter_tables(client: redis.Redis, prefix: str) -> Iterator[str]:
    for name in client.sscan_iter(wire.tables_key(prefix), count=BATCH):
        yield name.decode()


def due_tables(client: redis.Redis, prefix: str, queued_ttl_ms: int,
               interval_ms: int = 0) -> list[str]:
    """Mark and return the tables that need a flush now: something pending, none queued or
    running, and their flush interval (``interval_ms`` unless the table sets its own) passed
    since they were last scheduled."""
    args = due_args(queued_ttl_ms, interval_ms, force=False)
    due: list[str] = []
    batch: list[str] = []

    def run(names: list[str]) -> None:
        hits = DUE.run_each(client, [(due_keys(wire.Keys(prefix, n)), args) for n in names])
        due.extend(n for n, hit in zip(names, hits, strict=True) if hit)

    for name in iter_tables(client, prefix):
        batch.append(name)
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
    """Run a round and ``send`` each due table; unmark a table whose send failed."""
    sent = []
    for table in due_tables(client, prefix, queued_ttl_ms, interval_ms):
        send_or_unmark(client, wire.Keys(prefix, table), send)
        sent.append(table)
    return sent
