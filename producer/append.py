"""How one batch is appended: a transaction of XADD and a checking script.

docs/spec.md ("The append transaction") is the specification any producer follows; this is
the Python producer's implementation of it. The payload goes to the stream with a plain
``XADD``, never through Lua: passing a payload through a script makes Redis copy it twice
more and cost about two thirds of the append throughput (measured in docs/performance.md).
So each batch is one ``MULTI``, every key of it in the table's hash slot:

    MULTI
    XADD  {prefix}:{<table>}:delta * arrow <payload> rows <n> batch <batch id>
    EVAL  append_check.lua ...                        (checks the append just made)
    EXEC

The table is registered (``SADD {prefix}:tables <table>``, another slot) before its first
append from a process, on its own: a crash in between leaves a registered, empty table.

``append_check.lua`` runs right after the ``XADD``, inside the same transaction, so nobody
sees the entry before it is checked. If the append must not stand (a retry of a batch already
appended, a schema conflict, backpressure, Redis out of memory), the script removes the
entry again (``XDEL``) and says why; otherwise it updates the table's schema, counters and
the batch's deduplication key. ``EVAL`` (not ``EVALSHA``) because a script missing from the
cache inside ``MULTI`` would fail only after the ``XADD`` had run.

The script learns the ID of the entry the ``XADD`` made from a consumer group of its own,
``deltaflush:append``, moved to ``$`` (the stream's last ID) and read with ``XINFO
GROUPS``: O(1), where reading the entry back would copy the payload again. The group is
never read from; it only marks a position.
"""

from __future__ import annotations

from typing import Any

from . import scripts, wire

#: Consumer group that marks the stream's last ID for the check; never read from.
ID_GROUP = "deltaflush:append"

#: How long a batch ID is remembered, so that a retried append is not added twice.
DEDUP_TTL_S = 120

#: The check script (``producer/lua/append_check.lua``; its header names KEYS and ARGV).
CHECK = scripts.load("append_check")

#: The script's refusals (1 is accepted).
CONFLICT, BACKPRESSURE, NO_MEMORY, PROTOCOL = 0, 2, 3, 4


def queue_append(pipe: Any, keys: wire.Keys, payload: Any, rows: int, batch_id: str,
                 schema: bytes, evolves_from: bytes, max_pending_bytes: int,
                 dead_id: str = "", protocol: int = wire.PROTOCOL) -> None:
    """Queue the ``XADD`` and its check on a transaction ``pipe`` (two replies: the new
    entry's ID and the check's verdict); ``protocol``: the version the producer speaks."""
    pipe.xadd(keys.delta, {wire.FIELD_ARROW: payload, wire.FIELD_ROWS: rows,
                           wire.FIELD_BATCH: batch_id})
    CHECK.queue(
        pipe,
        keys={"schema": keys.schema, "delta": keys.delta, "pending": keys.pending,
              "stats": keys.stats, "dedup": keys.dedup(batch_id), "dead": keys.dead,
              "protocol": keys.protocol},
        args={"schema": schema, "payload_bytes": len(payload), "rows": rows,
              "evolves_from": evolves_from, "max_pending_bytes": max_pending_bytes,
              "dead_id": dead_id, "dedup_ttl_s": DEDUP_TTL_S, "id_group": ID_GROUP,
              "protocol": protocol})
