"""What a range looks like to Delta Lake: its schema, partition values, file statistics and
the app-transaction version that records it. Pure functions; no I/O.

**Types.** delta-rs cannot widen a column's type in place (no ``typeWidening`` writer
support), while a deltaflush table's schema may widen (``int32`` -> ``int64``, ``float32`` ->
``float64``). So every column is stored in the widest type of its family from the start:
integers as ``long``, floats as ``double``, timestamps in microseconds (Delta's unit; finer
units are truncated), large strings and binaries (fixed-size ones too) as plain ones,
dictionaries as their values,
a ``decimal256`` of up to 38 digits as ``decimal128`` (Delta has no wider decimal). Inside
nested columns children keep their width but become types delta-rs writes as they are
(``_nested``).
A widening within a family then changes nothing in the Delta table; one across families (an
integer column becoming a float) cannot be stored and marks the table stuck, with the reason.
A column that is still all-null (Arrow ``null``) is left out until it gets a type; an added
column is a metadata commit that adds it, nullable (``workers.sinks.delta``).

**Partitions.** ``partition_by`` columns are Delta partition columns (not stored in the
files, values in each add action). Delta has no partition transforms, so ``partition_time``
(``ts:day:event_date``) adds a real column, ``event_date``, partitioned by: a ``date`` for
a day bucket, a string (``2026-11-24-10``, ``2026-11``) for an hour or a month bucket, the
same text the ``parquet`` format puts in its folder names.

**Exactly once.** A commit records its range in the Delta app transaction of the stream:
``appId`` ``deltaflush:<stream>`` and ``version`` the range's last entry ID ``<ms>-<seq>``
as ``ms << 21 | seq``, an integer that grows with the ID (see ``txn_version``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from producer import wire
from producer.delta_table import APP_PREFIX as APP_PREFIX
from producer.delta_table import SEQ_BITS
from producer.delta_table import app_id as app_id
from producer.delta_table import entry_id as entry_id
from producer.errors import InvariantViolation
from producer.tablecfg import TableConfig
from producer.typepolicy import contains
from workers.layout import HIVE_NULL

#: Bits of an entry ID's milliseconds (up to the year 2109): ``ms << 21 | seq`` fits
#: Delta's signed 64-bit ``version``.
MS_BITS = 63 - SEQ_BITS


class NotStorable(InvariantViolation):
    """A range cannot be stored in its Delta table as it stands (a column type Delta Lake
    has no equivalent for, a type change delta-rs cannot make, partition columns that differ
    from the table's, an entry ID out of range). Retrying cannot help: the table is marked
    stuck with this message, which says what to change."""


# --- the app transaction -------------------------------------------------------------------


def txn_version(entry_id: str) -> int:
    """Stream entry ID ``<ms>-<seq>`` as an app-transaction version, ``ms << 21 | seq``:
    greater IDs give greater versions. Refuses a sequence number of 2**21 or more (Redis
    gives one only to explicit IDs, never to ``XADD *`` at fewer than two million entries
    per millisecond) and milliseconds past the year 2109."""
    ms, seq = wire.parse_id(entry_id)
    if seq >= 1 << SEQ_BITS or ms >= 1 << MS_BITS or ms < 0 or seq < 0:
        raise NotStorable(
            f"stream entry ID {entry_id} cannot be recorded in a Delta app transaction: its "
            f"sequence number must be below {1 << SEQ_BITS} and its milliseconds below "
            f"{1 << MS_BITS}. Append with auto-generated IDs (XADD *), or use the parquet "
            "format for this table")
    return ms << SEQ_BITS | seq


# --- types ---------------------------------------------------------------------------------

def storage_type(t: pa.DataType, column: str) -> pa.DataType | None:
    """The Arrow type column ``column`` of type ``t`` is stored in (see the module doc);
    None for an all-null column, left out until it has a type."""
    if pa.types.is_null(t):
        return None
    if pa.types.is_dictionary(t):
        return storage_type(t.value_type, column)
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", "UTC" if t.tz is not None else None)
    if pa.types.is_date(t):
        return pa.date32()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if (pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t)):
        return pa.binary()
    if pa.types.is_decimal(t) and t.precision <= 38:
        return pa.decimal128(t.precision, t.scale)
    if pa.types.is_decimal(t):
        raise NotStorable(
            f"column {column!r} has type {t}: Delta Lake's decimals have at most 38 digits; "
            "cast it to decimal128(38, scale) if its values fit, or to a string, before "
            "appending, or use the parquet format")
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_boolean(t):
        return t
    if pa.types.is_nested(t):
        return _nested(t, column)
    raise NotStorable(
        f"column {column!r} has type {t}, which Delta Lake cannot store; cast it before "
        "appending (e.g. a time or a duration to int64) or use the parquet format")


#: Unsigned integers inside nested columns: the next wider signed type holds every value
#: (delta-rs would store ``uint8`` as ``byte``, failing on a value over 127).
_WIDER_SIGNED = {8: pa.int16(), 16: pa.int32(), 32: pa.int64(), 64: pa.int64()}


def _nested(t: pa.DataType, path: str) -> pa.DataType:
    """A list, struct or map type with each child in a type Delta stores and delta-rs
    writes as it is: children keep their width (a nested column's type is fixed at its
    creation like any other), but unsigned integers become wider signed ones, timestamps
    microseconds, and what Delta has no type for (times, durations, decimals over 38
    digits) raises ``NotStorable`` naming the field, before delta-rs sees it (it failed with
    a bare error, or made a table its own reader refused, for nanoseconds)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_child(t.value_type, f"{path}[]")))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_child(f.type, f"{path}.{f.name}")) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_child(t.key_type, f"{path}.key")),
                       t.item_field.with_type(_child(t.item_type, f"{path}.value")),
                       t.keys_sorted)
    raise NotStorable(f"column {path!r} has type {t}, which Delta Lake cannot store; cast "
                      "it before appending or use the parquet format")


def _child(t: pa.DataType, path: str) -> pa.DataType:
    """A nested column's child type as stored (see ``_nested``)."""
    if pa.types.is_null(t) or pa.types.is_signed_integer(t):
        return t
    if pa.types.is_unsigned_integer(t):
        return _WIDER_SIGNED[t.bit_width]
    if pa.types.is_floating(t):
        return pa.float32() if pa.types.is_float16(t) else t
    stored = storage_type(t, path)
    assert stored is not None  # only a null type has none
    return stored


def file_schema(schema: pa.Schema) -> pa.Schema:
    """The schema a range of ``schema`` is written in: storage types, all nullable."""
    fields = []
    for f in schema:
        t = storage_type(f.type, f.name)
        if t is not None:
            fields.append(pa.field(f.name, t, nullable=True))
    return pa.schema(fields)


def conform(data: pa.Table, target: pa.Schema) -> pa.Table:
    """``data`` in ``target`` (a ``file_schema``): columns left out dropped, types cast.
    Timestamps may lose digits below the microsecond (Delta's unit). A value that does not
    fit (a uint64 over 2**63-1, which the flush's decoding sets aside as a dead letter
    before it gets here) raises ``NotStorable``: the table is stuck, never a flush failing
    in a loop."""
    columns = []
    for f in target:
        column = data.column(f.name)
        if not column.type.equals(f.type):
            try:
                column = pc.cast(column, f.type, safe=not contains(f.type, pa.types.is_timestamp))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise NotStorable(
                    f"a value of column {f.name!r} ({column.type}) does not fit the Delta "
                    f"table's type {f.type}: {exc}. The range is left in Redis; append such "
                    "values as another type, or use the parquet format") from exc
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def bucket_type(config: TableConfig) -> pa.DataType | None:
    """The type of the ``partition_time`` bucket column (None if the table has none)."""
    time = config.time
    if time is None:
        return None
    return pa.date32() if time.bucket == "day" else pa.string()


def table_schema(schema: pa.Schema, config: TableConfig) -> tuple[pa.Schema, list[str]]:
    """The Delta table schema of a range of ``schema`` and its partition columns."""
    stored = file_schema(schema)
    parts = [c for c in config.partition_by if c in stored.names]
    time = config.time
    if time is not None and time.column in stored.names:
        stored = stored.append(pa.field(time.name, bucket_type(config), nullable=True))
        parts.append(time.name)
    return stored, parts


# --- partition values ----------------------------------------------------------------------

_ESCAPED = re.compile(r"%([0-9A-F]{2})")


def partition_values(folder: str, columns: list[str],
                     schema: pa.Schema) -> dict[str, str | None]:
    """The Delta partition values of a file in partition folder ``folder``
    (``workers.layout``: ``col=value/...``, one segment per partition column in order),
    serialised as Delta wants them."""
    if not columns:
        return {}
    segments = folder.split("/")
    if len(segments) != len(columns):
        raise ValueError(f"partition folder {folder!r} does not match columns {columns}")
    values: dict[str, str | None] = {}
    for column, segment in zip(columns, segments, strict=True):
        raw = segment[len(column) + 1:]
        if raw == HIVE_NULL:
            values[column] = None
            continue
        text = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), raw)
        t = schema.field(column).type
        if pa.types.is_timestamp(t) and t.tz is not None:
            # pyarrow prints "2026-11-24 10:00:00.000000Z"; Delta takes ISO 8601 in UTC
            text = text.replace(" ", "T", 1)
        values[column] = text
    return values


# --- statistics ----------------------------------------------------------------------------


def stats_json(metadata: Any, schema: pa.Schema, partition_columns: list[str]) -> str:
    """The Delta ``stats`` of a file from its Parquet footer (``FileMetaData``):
    ``numRecords`` and, per top-level primitive column, ``nullCount``, ``minValues`` and
    ``maxValues`` where every row group has them, so readers can skip the file."""
    stats: dict[str, Any] = {"numRecords": metadata.num_rows}
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    paths = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    for field in schema:
        if field.name in partition_columns or field.name not in paths:
            continue
        index = paths[field.name]
        lo: Any = None
        hi: Any = None
        nulls_seen, complete = 0, True
        for g in range(metadata.num_row_groups):
            column = metadata.row_group(g).column(index)
            s = column.statistics
            if s is None or not s.has_null_count:
                complete = False
                break
            nulls_seen += s.null_count
            if s.has_min_max:
                lo = s.min if lo is None else min(lo, s.min)
                hi = s.max if hi is None else max(hi, s.max)
            elif s.null_count != column.num_values:  # values, but no min/max for them
                lo = hi = _NO_BOUNDS
        if not complete:
            continue
        nulls[field.name] = nulls_seen
        if lo is not None and lo is not _NO_BOUNDS and _boundable(field.type):
            lo_json, hi_json = _json_value(lo, field.type), _json_value(hi, field.type)
            if lo_json is not None and hi_json is not None:
                mins[field.name], maxs[field.name] = lo_json, hi_json
    stats.update(minValues=mins, maxValues=maxs, nullCount=nulls)
    return json.dumps(stats, separators=(",", ":"), allow_nan=False)


_NO_BOUNDS = object()


def _boundable(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_date(t) or pa.types.is_timestamp(t))


def _json_value(value: Any, t: pa.DataType) -> Any:
    """A statistic as Delta's JSON has it (None: leave the bound out)."""
    if isinstance(value, float) and not math.isfinite(value):
        # NaN bounds prune nothing safely; JSON has no infinities (Python would write
        # ``Infinity``, which delta-rs refuses to parse, failing every later commit)
        return None
    if pa.types.is_timestamp(t):
        if not isinstance(value, dt.datetime):
            return None
        if t.tz is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if pa.types.is_date(t):
        return value.isoformat() if isinstance(value, dt.date) else None
    if isinstance(value, bytes):
        return None
    return value
