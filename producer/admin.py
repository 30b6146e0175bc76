"""Table administration, shared by ``Producer`` and the ``deltaflush`` command: which tables
exist, their configuration (and the one rule that guards a change of it), their dead
letters, and what some readers would reject in their columns.

The layout rule (``parquet`` tables): once a table has flushed files, its partitioning
(``partition_by``, ``partition_time``) and ``spark_compatible`` stay as they are. Readers
take a table's folder as one dataset: a file at the root beside Hive folders, or the same
column in two types, makes DuckDB's ``read_parquet(..., hive_partitioning=true)`` fail,
polars raise, and Spark silently skip rows. So the change is refused with a message that
says how to move to a new table instead. It is race-free: the check and the write are one
``WATCH``/``MULTI`` transaction over the table's counters, lease and claim, and a change is
also refused while a flush holds the lease or a claim waits to be resumed (either may
already have read, or recorded, the old layout). Every other setting (sort order, codecs,
row groups, interval) may change at any time: it changes how files are written, not how they
are read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, cast

import pyarrow as pa

from . import shards, typepolicy, wire
from .errors import ConfigError, InvalidTableName, LayoutLocked, UnknownTable
from .tablecfg import TableConfig

#: Settings that decide how a table's files are read (folders, column types).
LAYOUT_SETTINGS = ("partition_by", "partition_time", "spark_compatible")


def keys_for(prefix: str, table: str) -> wire.Keys:
    """The table's keys; ``InvalidTableName`` if the name breaks the rule."""
    if not wire.valid_table_name(table):
        raise InvalidTableName(table)
    return wire.Keys(prefix, table)


def require_table(client: Any, prefix: str, table: str) -> wire.Keys:
    """The keys of a registered table (in ``{prefix}:tables``), else ``InvalidTableName`` or
    ``UnknownTable`` naming close matches."""
    keys = keys_for(prefix, table)
    if not client.sismember(wire.tables_key(prefix), table):
        names = sorted(n.decode() for n in client.smembers(wire.tables_key(prefix)))
        raise UnknownTable(table, difflib.get_close_matches(table, names, n=3))
    return keys


def table_config(client: Any, keys: wire.Keys) -> TableConfig:
    return TableConfig.from_json(client.get(keys.config))


def configure(client: Any, prefix: str, table: str, changes: dict[str, Any],
              default_format: str = "parquet") -> TableConfig:
    """Change the table's configuration (registering the table); return the new one. The
    first configuration pins the table's format (``default_format`` unless given).

    Raises ``ConfigError`` for unknown or invalid settings, columns the table does not have
    and a change of format once the table has data, and ``LayoutLocked`` for a layout change
    the readers could not follow (see the module docstring)."""
    keys = keys_for(prefix, table)
    result: list[TableConfig] = []
    _prepare_shards(client, prefix, keys, changes)

    def update(pipe: Any) -> None:
        current = TableConfig.from_json(pipe.get(keys.config))
        new = current.with_changes(**changes).with_format(default_format)
        if current.format is not None and new.format != current.format and (
                any(int(n or 0) for n in pipe.hmget(keys.stats, "files", "rows"))
                or pipe.exists(keys.lease) or pipe.exists(keys.claim)):
            raise ConfigError(
                f"table {table!r} already has data flushed as {current.format}; its "
                f"format cannot change to {new.format}. Append to a new table with "
                f"format={new.format!r} instead (and copy the old table's rows over).")
        stored = pipe.get(keys.schema)
        if stored:
            schema = wire.stored_schema(stored)
            new.check_schema(schema, table)
            if new.spark_compatible and not current.spark_compatible:
                refused = typepolicy.refusal(schema, True, table)
                if refused is not None:
                    raise ConfigError(f"spark_compatible cannot be turned on: {refused}")
        # Lake tables keep their own schema and partition spec, read through a catalog or a
        # log: the rule is for folders of plain Parquet files.
        if new.format == "parquet" and new.layout() != current.layout():
            _check_layout_change(pipe, keys, current, new)
        pipe.multi()
        pipe.set(keys.config, new.to_json())
        if new.flush_interval_s is None:
            pipe.hdel(keys.sched, "interval_ms")
        else:
            pipe.hset(keys.sched, "interval_ms", int(new.flush_interval_s * 1000))
        result.append(new)

    # Watched: whatever the checks read. A flush that takes the lease, or commits a file,
    # between the checks and the write makes the transaction run again, and refuse.
    client.transaction(update, keys.config, keys.schema, keys.sched, keys.stats, keys.lease,
                       keys.claim)
    # Not in the transaction: another hash slot than the table's keys (Redis Cluster).
    client.sadd(wire.tables_key(prefix), table)
    new = result[-1]
    for shard in shards.table_shards(client, prefix, table)[1:]:  # their own slots
        if new.flush_interval_s is None:
            client.hdel(shard.sched, "interval_ms")
        else:
            client.hset(shard.sched, "interval_ms", int(new.flush_interval_s * 1000))
    return new


def _prepare_shards(client: Any, prefix: str, keys: wire.Keys,
                    changes: dict[str, Any]) -> None:
    """Before a configuration with more than one shard is written (and producers may send
    batches to its shards): check it, record the shard count (the workers flush every shard
    below the largest count ever) and make every shard require protocol 2 (a protocol-1
    producer knows nothing of shards: it would write to shard 0 only, out of key order)."""
    if "shards" not in changes and "shard_key" not in changes:
        return
    current = TableConfig.from_json(client.get(keys.config))
    new = current.with_changes(**changes)
    stored = client.get(keys.authority)
    if stored and new.shard_key:
        shards.check_key(wire.stored_schema(stored), new.shard_key, keys.table)
    if new.shards > 1:
        count = shards.record(client, prefix, keys.table, new.shards)
        for shard in range(count):
            protocol = keys.for_shard(shard).protocol
            if int(client.get(protocol) or 1) < shards.PROTOCOL:
                client.set(protocol, shards.PROTOCOL)


def _check_layout_change(pipe: Any, keys: wire.Keys, current: TableConfig,
                         new: TableConfig) -> None:
    changed = ", ".join(f"{name} {getattr(current, name)!r} -> {getattr(new, name)!r}"
                        for name in LAYOUT_SETTINGS
                        if getattr(current, name) != getattr(new, name))
    files = int(pipe.hget(keys.stats, "files") or 0)
    table = keys.table
    if files:
        raise LayoutLocked(
            f"table {table!r} has {files} flushed files in its current layout, so its layout "
            f"stays ({changed} refused): files of two layouts side by side break the readers "
            "(DuckDB with hive_partitioning and polars fail, Spark silently skips rows). "
            f"Move to a new table instead: give a new table (e.g. '{table}_v2') the new "
            "layout, append to it from now on, and copy the old rows into it (README, "
            "'Changing a table's layout')."
        )
    if pipe.exists(keys.lease) or pipe.exists(keys.claim):
        raise LayoutLocked(
            f"a flush of table {table!r} is running or waits to be resumed, and may be "
            f"writing its first files in the current layout ({changed} refused); try again "
            f"once `deltaflush status {table}` shows it idle."
        )


@dataclass
class TableInfo:
    """What ``deltaflush table show`` prints: configuration, columns, reader warnings."""

    table: str
    config: TableConfig
    schema: pa.Schema | None
    files_flushed: int
    findings: list[typepolicy.Finding] = field(default_factory=list)

    @property
    def layout_locked(self) -> bool:
        return self.files_flushed > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "config": self.config.describe(),
            "columns": ({f.name: str(f.type) for f in self.schema}
                        if self.schema is not None else None),
            "files_flushed": self.files_flushed,
            "layout_locked": self.layout_locked,
            "warnings": [{"column": f.column, "type": f.type, "action": f.action,
                          "reason": f.reason, "written_as": f.written_as}
                         for f in self.findings],
        }


def table_info(client: Any, keys: wire.Keys) -> TableInfo:
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.config)
    pipe.get(keys.schema)
    pipe.hget(keys.stats, "files")
    raw_config, raw_schema, files = pipe.execute()
    for shard in shards.table_shards(client, keys.prefix, keys.table)[1:]:
        files = int(files or 0) + int(client.hget(shard.stats, "files") or 0)
    config = TableConfig.from_json(raw_config)
    schema = wire.stored_schema(raw_schema) if raw_schema else None
    findings = list(typepolicy.findings(schema, config.spark_compatible)) if schema else []
    return TableInfo(keys.table, config, schema, int(files or 0), findings)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    origin: str  # its ID in the delta stream
    size: int  # bytes of its Arrow payload
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "entry_id": self.origin, "bytes": self.size,
                "error": self.error}


def dead_letters(client: Any, keys: wire.Keys, limit: int) -> tuple[list[DeadLetter], int]:
    """The first ``limit`` dead letters of the table (shard by shard, for a sharded table:
    an ID then reads ``<shard>:<id>``), and how many it has."""
    streams = shards.table_shards(client, keys.prefix, keys.table)
    pipe = client.pipeline(transaction=False)
    for k in streams:
        pipe.xrange(k.dead, count=limit)
        pipe.xlen(k.dead)
    replies = pipe.execute()
    letters, total = [], 0
    for n, k in enumerate(streams):
        entries, count = replies[2 * n], replies[2 * n + 1]
        total += int(count)
        tag = f"{k.shard}:" if len(streams) > 1 else ""
        letters += [
            DeadLetter(tag + entry_id.decode(), fields.get(wire.FIELD_ENTRY_ID, b"?").decode(),
                       len(fields.get(wire.FIELD_ARROW, b"")),
                       fields.get(wire.FIELD_ERROR, b"").decode(errors="replace"))
            for entry_id, fields in cast(list[wire.Entry], entries)]
    return letters[:limit], total
