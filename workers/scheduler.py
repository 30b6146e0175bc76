"""One scheduling round: which tables get a ``flush_table`` now.

Beat sends the scheduling task every ``flush_interval_s``; a worker runs :func:`due_tables`
and enqueues one flush per table it returns. A table is due when it has something pending
(entries in its delta, or a claim left by a crashed flusher), no flush of it is queued
(``{T}:queued``) and none is running (``{T}:lease``). The check and the setting of
``{T}:queued`` happen in one script per table, so two scheduling rounds never both queue a
flush of the same table; the scripts of all tables go out in pipelined batches.

``{T}:queued`` expires after a lease period: a lost message delays a table by at most that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis

from producer import wire

# KEYS: queued, lease, delta, claim   ARGV: queued ttl ms
DUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('XLEN', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""

BATCH = 1000


def iter_tables(client: redis.Redis, prefix: str) -> Iterator[str]:
    for name in client.sscan_iter(wire.tables_key(prefix), count=BATCH):
        yield name.decode()


def due_tables(client: redis.Redis, prefix: str, queued_ttl_ms: int) -> list[str]:
    """Mark and return the tables that need a flush now."""
    sha = client.script_load(DUE_LUA)
    due: list[str] = []
    batch: list[str] = []

    def run(names: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for name in names:
            k = wire.Keys(prefix, name)
            pipe.evalsha(sha, 4, k.queued, k.lease, k.delta, k.claim, queued_ttl_ms)
        due.extend(n for n, hit in zip(names, pipe.execute(), strict=True) if hit)

    for name in iter_tables(client, prefix):
        batch.append(name)
        if len(batch) >= BATCH:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return due


def enqueue_due(
    client: redis.Redis, prefix: str, queued_ttl_ms: int, send: Callable[[str], object]
) -> list[str]:
    """Run a round and ``send`` each due table; unmark a table whose send failed."""
    sent = []
    for table in due_tables(client, prefix, queued_ttl_ms):
        try:
            send(table)
        except Exception:
            client.delete(wire.Keys(prefix, table).queued)
            raise
        sent.append(table)
    return sent
