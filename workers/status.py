"""How far behind each table is: read from Redis in one pipelined round trip per 500 tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis

from producer import wire

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

    @property
    def state(self) -> str:
        if self.stuck is not None:
            return "stuck"
        if self.flushing:
            return "flushing"
        return "pending" if self.pending_entries else "idle"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state}


def table_status(client: redis.Redis, prefix: str, tables: list[str] | None = None,
                 now_ms: int | None = None) -> list[TableStatus]:
    names = sorted(tables if tables is not None else iter_tables(client, prefix))
    if now_ms is None:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
    out: list[TableStatus] = []
    for i in range(0, len(names), 500):
        chunk = names[i:i + 500]
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            k = wire.Keys(prefix, name)
            pipe.xlen(k.delta)
            pipe.hgetall(k.pending)
            pipe.xrange(k.delta, "-", "+", count=1)
            pipe.hgetall(k.stats)
            pipe.xlen(k.dead)
            pipe.exists(k.lease)
            pipe.hget(k.stuck, "reason")
            pipe.hgetall(k.lake)
        replies = pipe.execute()
        for j, name in enumerate(chunk):
            xlen, pending, first, stats, dead, leased, stuck, lake = replies[j * 8:(j + 1) * 8]
            oldest = None
            if first:
                oldest = max(0.0, (now_ms - wire.parse_id(first[0][0])[0]) / 1000)
            last_flush = int(stats.get(b"last_flush_ms", 0))
            out.append(TableStatus(
                table=name,
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
    return out


def unstick(client: redis.Redis, keys: wire.Keys) -> str | None:
    """Clear a table's stuck mark; return why it was stuck (None if it was not)."""
    pipe = client.pipeline()
    pipe.hget(keys.stuck, "reason")
    pipe.delete(keys.stuck)
    reason, _ = pipe.execute()
    return reason.decode(errors="replace") if reason is not None else None
