"""Maintenance of lake tables, whatever their format: it calls only the ``Maintainable``
protocol of the table's sink (``workers.sinks``), so Iceberg and Delta tables are maintained
by the same code.

* **When.** Every scheduling round (beat, ``deltaflush.schedule_flushes``) also checks, at
  most every ``ROUND_S`` (or flush interval, if shorter), which lake tables are due: one
  script per table (``producer/lua/maintain_due.lua``, in pipelined batches) finds the
  table's format and ``maintenance_interval_s`` in its configuration and marks it
  scheduled, so two rounds never both queue it. A due table gets
  ``deltaflush.maintain_table(table)`` on the project's queue.
* **What.** ``maintain`` follows the table's policy: compact once the table has
  ``compact_min_small_files`` small files, expire snapshots older than
  ``snapshot_retention_s``, and (at most every ``ORPHANS_EVERY_S``, a listing of the whole
  table) remove files no snapshot references that are older than ``orphan_retention_s``.
* **One at a time.** A run holds the table's maintenance lock (``{T}:maint_lock``, a lease
  with a fencing token, renewed while it runs, as long as a flush lease), so two runs
  never overlap; flushes do not
  take it and go on meanwhile. The lock only saves work: each step is one atomic commit
  that a concurrent commit makes fail and retry, so even overlapping runs stay correct.
* **Seen.** Each run stores the sink's ``describe`` in ``{T}:lake`` (status and metrics
  read it), and counts what it did in ``{T}:stats`` (``lake_compactions``, ...); each flush
  commit counts itself there too (``record_commit``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from producer import scripts, wire
from producer.client import connect
from producer.errors import ConfigError
from producer.settings import Settings
from producer.tablecfg import TableConfig

from .lease import acquire
from .scheduler import BATCH, iter_tables
from .sinks import Maintainable, TableInfo

if TYPE_CHECKING:
    from .flusher import Flusher
    from .protocol import Done

log = logging.getLogger(__name__)

DUE = scripts.load("maintain_due")
#: Seconds between two checks of which tables are due (policies are in minutes).
ROUND_S = 10.0
#: Orphan removal lists the whole table: at most once an hour per table.
ORPHANS_EVERY_S = 3600.0
LAKE_FORMATS = ("iceberg", "delta")


class NotALakeTable(ConfigError):
    """Maintenance was asked of a table whose format has none (``parquet``)."""


@dataclass(frozen=True)
class _LockKeys(wire.Keys):
    """A table's keys with the maintenance lock in place of the flush lease, so that the
    lease code (token, renewal, release) serves as the maintenance lock."""

    @property
    def lease(self) -> str:
        return self.maint_lock

    @property
    def fence(self) -> str:
        return self.maint_fence


def maintainable(sink: object) -> Maintainable | None:
    """The sink as ``Maintainable``, or None if its format has no maintenance."""
    methods = ("describe", "compact", "expire_snapshots", "remove_orphans")
    return cast(Maintainable, sink) if all(hasattr(sink, m) for m in methods) else None


def lake_sink(flusher: Flusher, config: TableConfig, table: str) -> Maintainable:
    fmt = config.format or flusher.settings.table_format
    sink = maintainable(flusher.sink_for(config)) if fmt in LAKE_FORMATS else None
    if sink is None:
        raise NotALakeTable(
            f"table {table!r} is a {fmt} table: compaction and snapshots are for lake tables "
            "(format iceberg or delta); a parquet table's files stay as flushed")
    return sink


def maintain(client: redis.Redis, flusher: Flusher, table: str, *, compact: bool | None = None,
             now: Callable[[], float] = time.time) -> dict[str, Any]:
    """One maintenance run of ``table`` following its policy (see the module doc), under
    its maintenance lock. ``compact=True`` compacts whatever the table's small files are
    (``deltaflush compact``), ``False`` never. Returns what was done (``status: busy`` if
    another run holds the lock)."""
    keys = wire.Keys(flusher.settings.key_prefix, table)
    config = TableConfig.from_json(client.get(keys.config))
    sink = lake_sink(flusher, config, table)
    # held like a flush lease: renewed every third of DELTAFLUSH_LEASE_S while the run goes
    # on, free again within that period once its worker is gone
    lock = acquire(client, _LockKeys(keys.prefix, table), flusher.settings.lease_ms)
    if lock is None:
        return {"table": table, "status": "busy"}
    done: dict[str, Any] = {"table": table, "status": "ok"}
    with lock:
        info = sink.describe(table, config)
        if compact or (compact is None and info.small_files >= config.compact_min_small_files):
            done["compaction"] = sink.compact(table, config)
        if compact is None:
            done["expiry"] = sink.expire_snapshots(table, config)
            last = float(cast(bytes | None, client.hget(keys.maint, "orphans_ms")) or 0)
            if now() * 1000 - last >= ORPHANS_EVERY_S * 1000:
                done["orphans"] = sink.remove_orphans(table, config)
                client.hset(keys.maint, "orphans_ms", int(now() * 1000))
        info = sink.describe(table, config)
    record(client, keys, info, done, now)
    done["table_info"] = asdict(info)
    log.info("maintained table=%s compacted=%s written=%s expired=%s orphans=%s files=%d "
             "small=%d", table, done.get("compaction", {}).get("compacted", 0),
             done.get("compaction", {}).get("written", 0),
             done.get("expiry", {}).get("expired", 0),
             done.get("orphans", {}).get("removed", "-"), info.files, info.small_files)
    return done


def compact_table(settings: Settings, table: str) -> dict[str, Any]:
    """``deltaflush compact TABLE``: compact now, whatever the policy says."""
    from .flusher import Flusher
    from .storage import Storage

    client = connect(settings.redis_url)
    try:
        return maintain(client, Flusher(client, Storage(settings.storage_uri), settings), table,
                        compact=True)
    finally:
        client.close()


def describe_table(settings: Settings, table: str, config: TableConfig) -> dict[str, Any]:
    """``deltaflush table show``: the lake table as its sink sees it now."""
    from .sinks import for_format
    from .storage import Storage

    fmt = config.format or settings.table_format
    sink = maintainable(for_format(fmt, Storage(settings.storage_uri), settings))
    if sink is None:
        raise NotALakeTable(f"table {table!r} is a {fmt} table")
    return asdict(sink.describe(table, config))


def record(client: redis.Redis, keys: wire.Keys, info: TableInfo, done: dict[str, Any],
           now: Callable[[], float] = time.time) -> None:
    """Store a table's description in ``{T}:lake`` and count a run in ``{T}:stats``."""
    compaction = done.get("compaction", {})
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.lake, mapping={
        "format": info.format, "snapshot": info.snapshot or "", "files": info.files,
        "small_files": info.small_files, "rows": info.rows or 0, "bytes": info.bytes or 0,
        "at_ms": int(now() * 1000)})
    if compaction.get("written"):
        pipe.hincrby(keys.stats, "lake_compactions", 1)
        pipe.hincrby(keys.stats, "lake_files_compacted", int(compaction.get("compacted", 0)))
    for field, value in (("lake_snapshots_expired", done.get("expiry", {}).get("expired", 0)),
                         ("lake_orphans_removed", done.get("orphans", {}).get("removed", 0))):
        if value:
            pipe.hincrby(keys.stats, field, int(value))
    pipe.execute()


def record_commit(client: redis.Redis, keys: wire.Keys, done: Done, fmt: str,
                  max_file_bytes: int) -> None:
    """Count one lake commit of a flush in ``{T}:stats`` (commits, conflicts met, ranges
    found committed already) and move ``{T}:lake`` on: its snapshot, and the files it
    added (the next maintenance run recounts them exactly)."""
    details = done.committed.details
    pipe = client.pipeline(transaction=False)
    if done.committed.already:
        pipe.hincrby(keys.stats, "lake_already", 1)
    else:
        config = TableConfig.from_json(done.range.config)
        small = (config.target_file_bytes or max_file_bytes) / 2
        pipe.hincrby(keys.stats, "lake_commits", 1)
        pipe.hset(keys.lake, mapping={"format": fmt,
                                      "snapshot": str(details.get("snapshot") or "")})
        pipe.hincrby(keys.lake, "files", len(done.committed.paths))
        pipe.hincrby(keys.lake, "small_files",
                     sum(1 for f in done.staged.files if f.size < small))
    if details.get("conflicts"):
        pipe.hincrby(keys.stats, "lake_conflicts", int(details["conflicts"]))
    pipe.execute()


def lake_info(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """``{T}:lake`` as status shows it (None for a table without one)."""
    if not raw:
        return None
    text = {k.decode(): v.decode() for k, v in raw.items()}
    return {"format": text.get("format"), "snapshot": text.get("snapshot") or None,
            "files": int(text.get("files", 0)), "small_files": int(text.get("small_files", 0))}


def due_tables(client: redis.Redis, prefix: str, default_interval_ms: int) -> list[str]:
    """Mark and return the lake tables due for maintenance (one script each, pipelined)."""
    due: list[str] = []
    names = list(iter_tables(client, prefix))
    args = {"default_interval_ms": default_interval_ms}
    for i in range(0, len(names), BATCH):
        chunk = names[i:i + BATCH]
        calls = []
        for name in chunk:
            k = wire.Keys(prefix, name)
            calls.append(({"config": k.config, "maint": k.maint, "lock": k.maint_lock}, args))
        due.extend(n for n, hit in zip(chunk, DUE.run_each(client, calls), strict=True)
                   if hit)
    return due


def enqueue_due(client: redis.Redis, prefix: str, send: Callable[[str], object],
                default_interval_ms: int = int(TableConfig().maintenance_interval_s * 1000),
                ) -> list[str]:
    """Send ``maintain_table`` for each due table; a table whose send fails is due again
    at the next round."""
    sent = []
    for table in due_tables(client, prefix, default_interval_ms):
        try:
            send(table)
        except Exception:
            client.hdel(wire.Keys(prefix, table).maint, "last_ms")
            raise
        sent.append(table)
    return sent
