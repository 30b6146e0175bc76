"""Per-table configuration: how a table's files are laid out, and how often it is flushed.

Kept as JSON in ``{prefix}:{<table>}:config``, set from code (``Producer.configure``) or the
CLI (``deltaflush table set``), and read by every worker at the start of each flush. A flush
records the configuration it used in its claim, so a resumed flush lays files out the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import pyarrow as pa

from .errors import ConfigError
from .shards import MAX_SHARDS, check_key

CODECS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
#: Table formats: Parquet files in a folder, an Apache Iceberg table, a Delta Lake table.
FORMATS = ("parquet", "iceberg", "delta")
BUCKETS = {"hour": "%Y-%m-%d-%H", "day": "%Y-%m-%d", "month": "%Y-%m"}


@dataclass(frozen=True)
class TimePartition:
    """Partition by a time bucket of a timestamp column, in UTC: ``ts:day`` writes folders
    ``ts_day=2026-11-24/``; ``ts:day:event_date`` names the folder key ``event_date``."""

    column: str
    bucket: str
    name: str

    @classmethod
    def parse(cls, spec: str) -> TimePartition:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts) or parts[1] not in BUCKETS:
            raise ConfigError(
                f"partition_time {spec!r} must be 'column:bucket' or 'column:bucket:name' "
                f"with bucket one of {sorted(BUCKETS)}, e.g. 'ts:day:event_date'"
            )
        column, bucket = parts[0], parts[1]
        return cls(column, bucket, parts[2] if len(parts) == 3 else f"{column}_{bucket}")

    def __str__(self) -> str:
        return f"{self.column}:{self.bucket}:{self.name}"


@dataclass(frozen=True)
class TableConfig:
    """The layout of one table's files. Every field has a default; see ``describe()``."""

    partition_by: tuple[str, ...] = ()
    partition_time: str = ""
    sort_by: tuple[str, ...] = ()
    compression: str = "zstd"
    compression_level: int | None = None
    row_group_rows: int = 1_000_000
    #: "auto": dictionary-encode string, binary and dictionary columns only; True: every
    #: column; False: none. Numbers of high cardinality (ids, timestamps, prices) gain
    #: nothing from a dictionary the writer abandons after 1 MiB: on the benchmark schema,
    #: leaving them out makes encoding 43% faster and files 24% smaller
    #: (docs/performance.md).
    dictionary: bool | str = "auto"
    statistics: bool = True
    flush_interval_s: float | None = None
    #: Write every column as a type Spark reads too: timestamps in microseconds, half
    #: floats as float32; refuse TIME columns and decimals over 38 digits at append. See
    #: ``producer.typepolicy``. Off: columns are written as they are.
    spark_compatible: bool = True
    #: ``parquet``, ``iceberg`` or ``delta``; None until chosen: the first configuration or
    #: flush of a table pins it (to ``DELTAFLUSH_TABLE_FORMAT`` unless given). Fixed once
    #: the table has flushed data.
    format: str | None = None
    # --- maintenance of lake tables (iceberg, delta): the policy beat follows ---------
    #: size files are compacted up to (None: ``DELTAFLUSH_MAX_FILE_BYTES``); a file under
    #: half of it is small
    target_file_bytes: int | None = None
    #: compact once the table has at least this many small files
    compact_min_small_files: int = 8
    #: snapshots older than this are expired (the current one never is); an hour keeps a
    #: table's metadata small (an Iceberg commit rewrites the list of live snapshots: with
    #: a day of them at the default interval, commits took seconds, docs/performance.md)
    snapshot_retention_s: float = 3600.0
    #: files no snapshot references are removed once older than this (far longer than any
    #: flush may hold a staged file before committing it)
    orphan_retention_s: float = 3 * 86400.0
    #: how often beat checks the table's policy
    maintenance_interval_s: float = 600.0
    # --- sharding (protocol 2, docs/shards.md) ----------------------------------------
    #: delta streams of the table, each in a hash slot of its own, flushed in parallel;
    #: more than 1 makes the table require protocol 2 of its producers
    shards: int = 1
    #: the column whose value picks a row's shard (rows of one key stay in order within
    #: their shard); empty: batches go round-robin over the shards
    shard_key: str = ""

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.compression not in CODECS:
            raise ConfigError(
                f"compression {self.compression!r} is not one of {', '.join(CODECS)}"
            )
        if self.compression_level is not None and self.compression in ("snappy", "none"):
            raise ConfigError(f"compression {self.compression!r} takes no compression_level")
        if self.dictionary not in (True, False, "auto"):
            raise ConfigError(f"dictionary must be true, false or 'auto', got {self.dictionary!r}")
        if self.row_group_rows < 1:
            raise ConfigError(f"row_group_rows must be >= 1, got {self.row_group_rows}")
        if self.flush_interval_s is not None and self.flush_interval_s <= 0:
            raise ConfigError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")
        if self.target_file_bytes is not None and self.target_file_bytes < 1024:
            raise ConfigError(f"target_file_bytes must be >= 1024, got {self.target_file_bytes}")
        for name in ("compact_min_small_files", "snapshot_retention_s", "orphan_retention_s",
                     "maintenance_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError(f"shards must be between 1 and {MAX_SHARDS}, got {self.shards}")
        if self.partition_time:
            TimePartition.parse(self.partition_time)
        names = list(self.partition_by) + ([self.time.name] if self.time else [])
        if len(set(names)) != len(names):
            raise ConfigError(f"partition keys repeat: {names}")
        if set(self.partition_by) & set(self.sort_by):
            raise ConfigError("a partition_by column cannot also be a sort_by column "
                              "(it has one value per file)")

    def layout(self) -> tuple[tuple[str, ...], str, bool]:
        """What decides the folders and column types of the files: once a table has files,
        readers need the next ones laid out the same (see ``producer.admin``)."""
        return (self.partition_by, str(self.time or ""), self.spark_compatible)

    @property
    def time(self) -> TimePartition | None:
        return TimePartition.parse(self.partition_time) if self.partition_time else None

    def parquet_options(self, schema: pa.Schema) -> dict[str, Any]:
        """``pyarrow.parquet.ParquetWriter`` options for files of ``schema``."""
        dictionary: bool | list[str] = self.dictionary is True
        if self.dictionary == "auto":
            dictionary = [f.name for f in schema if _dictionary_worthy(f.type)]
        return {
            "compression": self.compression,
            "compression_level": self.compression_level,
            "use_dictionary": dictionary,
            "write_statistics": self.statistics,
        }

    def check_schema(self, schema: pa.Schema, table: str) -> None:
        """Raise ``ConfigError`` if a column this configuration names is not usable."""
        if self.shard_key:
            check_key(schema, self.shard_key, table)
        for name in (*self.partition_by, *self.sort_by):
            if schema.get_field_index(name) < 0:
                raise ConfigError(f"table {table!r} has no column {name!r}; "
                                  f"its columns are {schema.names}")
        if self.time:
            idx = schema.get_field_index(self.time.column)
            if idx < 0 or not pa.types.is_timestamp(schema.field(idx).type):
                raise ConfigError(f"partition_time needs a timestamp column of {table!r}; "
                                  f"{self.time.column!r} is not one")

    # --- (de)serialisation -------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> TableConfig:
        if not text:
            return cls()
        data = json.loads(text)
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> TableConfig:
        return cls().with_changes(**data)

    def with_changes(self, **changes: Any) -> TableConfig:
        """A copy with ``changes``; values may be strings (as from a command line)."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(f"unknown table setting(s) {unknown}; known: {sorted(known)}")
        parsed = {name: _parse(name, value) for name, value in changes.items()}
        return replace(self, **parsed)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def with_format(self, default: str) -> TableConfig:
        """This configuration with its format pinned (``default`` if none was chosen)."""
        return self if self.format is not None else replace(self, format=default)


def _dictionary_worthy(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_dictionary(t))


def _parse(name: str, value: Any) -> Any:
    try:
        if name in ("partition_by", "sort_by"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if name == "format":
            return None if value in (None, "") else str(value).lower()
        if name in ("compression", "partition_time"):
            return "" if value is None else str(value).lower() if name == "compression" \
                else str(value)
        if name == "dictionary" and str(value).lower() == "auto":
            return "auto"
        if name in ("dictionary", "statistics", "spark_compatible"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if name == "shard_key":
            return "" if value is None else str(value).strip()
        if name in ("row_group_rows", "compact_min_small_files", "shards"):
            return int(value)
        if name == "target_file_bytes":
            return None if value in (None, "", "default") else int(value)
        if name in ("snapshot_retention_s", "orphan_retention_s", "maintenance_interval_s"):
            return float(value)
        if name in ("compression_level", "flush_interval_s"):
            if value in (None, "", "default"):
                return None
            return int(value) if name == "compression_level" else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"table setting {name}={value!r} is not valid") from None
    return value
