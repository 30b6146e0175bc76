"""How far behind each table is: read from Redis in one pipelined round trip per 500 streams.

A sharded table's status sums its shards' (the oldest pending entry is the oldest of any
shard), and lists each shard's own in ``shards``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis

from producer import shards, wire

from .maintenance import lake_info
from .scheduler import iter_tables


@dataclass
class TableStatus:
    table: str
    pending_entries: int
    pending_rows: int
    pending_bytes: int
    oldest_pending_age_s: float | None
    files_flushed: int
    rows_flushed: int
    bytes_flushed: int
    dead_entries: int
    flushing: bool
    last_flush_age_s: float | None
    #: why the table is stuck (no flush runs until ``deltaflush table unstick``), or None
    stuck: str | None = None
    #: a lake table's format, current snapshot, file and small-file counts (``{T}:lake``,
    #: moved on by each commit, recounted by each maintenance run); None for parquet
    lake: dict[str, Any] | None = None
    #: the shard this status is of (None: a whole table)
    shard: int | None = None
    #: a sharded table's status per shard (None for a table never sharded)
    shards: list[TableStatus] | None = None

    @property
    def state(self) -> str:
        if self.stuck is not None:
            return "stuck"
        if self.flushing:
            return "flushing"
        return "pending" if self.pending_entries else "idle"

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "state": self.state}
        if self.shards is not None:
            out["shards"] = [s.as_dict() for s in self.shards]
        return out


def _summed(parts: list[TableStatus]) -> TableStatus:
    """One table's status from its shards'."""
    total = TableStatus(parts[0].table, 0, 0, 0, None, 0, 0, 0, 0, False, None,
                        lake=parts[0].lake, shards=parts)
    for s in parts:
        for name in ("pending_entries", "pending_rows", "pending_bytes", "files_flushed",
                     "rows_flushed", "bytes_flushed", "dead_entries"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.flushing = total.flushing or s.flushing
        total.stuck = total.stuck or (None if s.stuck is None else f"shard {s.shard}: {s.stuck}")
        ages = [a for a in (total.oldest_pending_age_s, s.oldest_pending_age_s) if a is not None]
        total.oldest_pending_age_s = max(ages) if ages else None
        lasts = [a for a in (total.last_flush_age_s, s.last_flush_age_s) if a is not None]
        total.last_flush_age_s = min(lasts) if lasts else None
    return total


def table_status(client: redis.Redis, prefix: str, tables: list[str] | None = None,
                 now_ms: int | None = None) -> list[TableStatus]:
    names = sorted(tables if tables is not None else iter_tables(client, prefix))
    if now_ms is None:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
    sharded = shards.sharded_tables(client, prefix)
    streams = [k for name in names for k in shards.all_shards(prefix, name, sharded)]
    out: list[TableStatus] = []
    for i in range(0, len(streams), 500):
        chunk = streams[i:i + 500]
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.xlen(k.delta)
            pipe.hgetall(k.pending)
            pipe.xrange(k.delta, "-", "+", count=1)
            pipe.hgetall(k.stats)
            pipe.xlen(k.dead)
            pipe.exists(k.lease)
            pipe.hget(k.stuck, "reason")
            pipe.hgetall(k.lake)
        replies = pipe.execute()
        for j, k in enumerate(chunk):
            xlen, pending, first, stats, dead, leased, stuck, lake = replies[j * 8:(j + 1) * 8]
            oldest = None
            if first:
                oldest = max(0.0, (now_ms - wire.parse_id(first[0][0])[0]) / 1000)
            last_flush = int(stats.get(b"last_flush_ms", 0))
            out.append(TableStatus(
                table=k.table, shard=k.shard if k.table in sharded else None,
                pending_entries=int(xlen),
                pending_rows=int(pending.get(b"rows", 0)) if xlen else 0,
                pending_bytes=int(pending.get(b"bytes", 0)) if xlen else 0,
                oldest_pending_age_s=oldest,
                files_flushed=int(stats.get(b"files", 0)),
                rows_flushed=int(stats.get(b"rows", 0)),
                bytes_flushed=int(stats.get(b"bytes", 0)),
                dead_entries=int(dead),
                flushing=bool(leased),
                last_flush_age_s=(now_ms - last_flush) / 1000 if last_flush else None,
                stuck=stuck.decode(errors="replace") if stuck is not None else None,
                lake=lake_info(lake),
            ))
    tables_out: list[TableStatus] = []
    for s in out:
        if s.shard is None:
            tables_out.append(s)
        elif s.shard == 0:
            tables_out.append(_summed([s]))
        else:
            assert tables_out[-1].shards is not None
            tables_out[-1] = _summed([*tables_out[-1].shards, s])
    return tables_out


def unstick(client: redis.Redis, keys: wire.Keys) -> str | None:
    """Clear a table's stuck mark; return why it was stuck (None if it was not)."""
    pipe = client.pipeline()
    pipe.hget(keys.stuck, "reason")
    pipe.delete(keys.stuck)
    reason, _ = pipe.execute()
    return reason.decode(errors="replace") if reason is not None else None
