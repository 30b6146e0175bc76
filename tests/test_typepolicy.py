"""Spark-safe types (``producer.typepolicy``): a table is ``spark_compatible`` by default.

Spark is not installed here; ``spark_rejects`` applies the rules of Spark's Parquet schema
converter (``ParquetToSparkSchemaConverter``: which physical and logical types it maps, and
which it calls "Illegal Parquet type") to the Parquet schema of every file written.
"""

import datetime as dt
import decimal
import re

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer import ConfigError, Producer, Settings, wire
from producer.errors import UnsupportedType
from producer.typepolicy import CONVERT, NOTE, REFUSE, findings
from tests.test_layout import ALL_TYPES
from workers.flusher import Flusher
from workers.storage import Storage

K = wire.Keys("deltaflush", "types")


def spark_rejects(path) -> list[str]:
    """The columns of a Parquet file that Spark's schema converter rejects."""
    bad = []
    names = [c.path.lower() for c in pq.ParquetFile(path).schema]
    for column in pq.ParquetFile(path).schema:
        logical = str(column.logical_type)
        if (logical.startswith("Timestamp") and "nanoseconds" in logical) \
                or logical.startswith("Time(") or logical in ("Float16", "UUID"):
            bad.append(column.path)
        if logical.startswith("Decimal") and column.precision > 38:
            bad.append(column.path)
        if names.count(column.path.lower()) > 1:
            bad.append(column.path)
    return bad


def flush(client, storage_dir, table="types"):
    return Flusher(client, Storage(str(storage_dir)), Settings()).flush(table)


#: The columns of ALL_TYPES that no conversion makes readable by Spark.
REFUSED = ["time32s", "time32ms", "time64us", "time64ns", "dec256"]


def test_a_default_table_writes_only_types_spark_reads(any_redis, storage_dir):
    data = ALL_TYPES.drop_columns(REFUSED).append_column(
        "f16", pa.array([1.5, None, -2.0], pa.float16())).append_column(
        "nested_ts", pa.array([{"at": 1_000_000_001}, None, {"at": -1_500}],
                              pa.struct([("at", pa.timestamp("ns"))])))
    p = Producer(client=any_redis, settings=Settings())
    assert p.table_config("types").spark_compatible
    p.append("types", data)
    assert flush(any_redis, storage_dir).rows == 3
    (path,) = (storage_dir / "types").glob("*.parquet")
    assert spark_rejects(path) == []
    back = pq.read_table(path)
    for unit in ("s", "ms", "ns"):  # every timestamp in microseconds, time zone kept
        assert back.schema.field(f"ts_{unit}").type == pa.timestamp("us")
        assert back.schema.field(f"tstz_{unit}").type == pa.timestamp("us", "America/New_York")
    assert back.schema.field("f16").type == pa.float32()
    assert back["f16"].to_pylist() == [1.5, None, -2.0]
    assert back["ts_s"].to_pylist() == data["ts_s"].to_pylist()  # exact for s and ms
    # nanoseconds lose their digits below a microsecond, truncated toward zero
    assert back["ts_ns"].cast(pa.int64()).to_pylist() == [0, None, 0]
    assert back["nested_ts"].to_pylist()[0]["at"] == dt.datetime(1970, 1, 1, 0, 0, 1)
    assert back["nested_ts"].to_pylist()[2]["at"] == dt.datetime(1969, 12, 31, 23, 59, 59,
                                                                  999999)
    for name in ("u64", "dur_ns", "map", "nested", "dec"):  # the rest as it was
        assert back.schema.field(name).type == data.schema.field(name).type, name
    # a dictionary is an encoding, not a type: its values' type (docs/spec.md)
    assert back.schema.field("dict").type == data.schema.field("dict").type.value_type
    assert pl.read_parquet(path).height == 3


def test_pandas_nanosecond_timestamps_land_in_microseconds(any_redis, storage_dir):
    """datetime64[ns], pandas' default resolution before pandas 3."""
    p = Producer(client=any_redis, settings=Settings())
    frame = pd.DataFrame({"id": [1, 2], "at": pd.Series(
        ["2026-01-02 03:04:05.123456", "2026-01-02 03:04:06"], dtype="datetime64[ns]")})
    p.append("types", frame)
    flush(any_redis, storage_dir)
    (path,) = (storage_dir / "types").glob("*.parquet")
    assert spark_rejects(path) == []
    assert pq.read_table(path)["at"].to_pylist()[0] == dt.datetime(2026, 1, 2, 3, 4, 5, 123456)


@pytest.mark.parametrize("column,data,reason", [
    ("opens", pa.array([dt.time(9, 30)], pa.time64("us")), "reads no Parquet TIME"),
    ("t", pa.array([1], pa.time32("s")), "reads no Parquet TIME"),
    ("amount", pa.array([decimal.Decimal(1)], pa.decimal256(40, 2)), "over 38 digits"),
    ("s", pa.array([{"t": 1}], pa.struct([("t", pa.time64("ns"))])), "reads no Parquet TIME"),
])
def test_types_spark_cannot_read_are_refused_at_append(any_redis, column, data, reason):
    p = Producer(client=any_redis, settings=Settings())
    with pytest.raises(UnsupportedType, match=reason) as err:
        p.append("types", pa.table({"id": [1], column: data}))
    assert isinstance(err.value, ValueError)
    assert column in str(err.value) and "--spark-compatible false" in str(err.value)
    assert any_redis.keys("*") == []  # nothing written


def test_names_equal_but_for_case_are_refused(any_redis):
    with pytest.raises(UnsupportedType, match="case"):
        Producer(client=any_redis, settings=Settings()).append("types", [{"Id": 1, "id": 2}])


def test_types_parquet_cannot_store_are_refused_whatever_the_setting(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    p.configure("types", spark_compatible=False)
    data = pa.table({"id": [1], "i": pa.array([None], pa.month_day_nano_interval())})
    with pytest.raises(UnsupportedType, match="Parquet cannot store it"):
        p.append("types", data)
    assert not any_redis.exists(K.delta)


def test_without_spark_compatible_every_type_is_taken_and_shown_as_a_warning(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    p.configure("types", spark_compatible=False)
    p.append("types", ALL_TYPES)
    by_column = {f.column: f for f in findings(ALL_TYPES.schema, False)}
    assert by_column["time64ns"].action == NOTE and "Spark" in by_column["time64ns"].reason
    assert by_column["dec256"].action == NOTE and "polars" in by_column["dec256"].reason
    assert by_column["u64"].action == NOTE
    # and turning it on is refused while the schema has such a column
    with pytest.raises(ConfigError, match="spark_compatible cannot be turned on.*dec256"):
        p.configure("types", spark_compatible=True)


def test_findings_of_a_default_table_say_what_is_converted():
    by_column = {f.column: f for f in findings(ALL_TYPES.schema, True)}
    assert by_column["ts_ns"].action == CONVERT and by_column["ts_ns"].written_as == \
        "timestamp[us]"
    assert by_column["time32ms"].action == REFUSE
    assert "ts_us" not in by_column and "i64" not in by_column


def test_a_foreign_batch_spark_cannot_read_becomes_a_dead_letter_then_replays(
        any_redis, storage_dir):
    """A producer in another language writes the wire format without the append check: the
    flush sets the batch aside with the reason (never loses it, never writes it)."""
    p = Producer(client=any_redis, settings=Settings())
    batch = pa.table({"id": [1, 2], "opens": pa.array([1, 2], pa.time64("us"))})
    any_redis.sadd(wire.tables_key("deltaflush"), "types")
    any_redis.xadd(K.delta, {wire.FIELD_ARROW: bytes(wire.encode_table(batch))})
    result = flush(any_redis, storage_dir)
    assert result.dead == 1 and result.rows == 0
    (dead,) = any_redis.xrange(K.dead)
    assert b"reads no Parquet TIME" in dead[1][wire.FIELD_ERROR]
    assert not list(storage_dir.rglob("*.parquet"))
    p.configure("types", spark_compatible=False)  # nothing flushed yet: allowed
    assert p.replay_dead("types") == (1, 0)
    assert flush(any_redis, storage_dir).rows == 2


def lake_ids_and_u(fmt, storage_dir):
    """``(id, u)`` rows of the lake table ``types``, read by the format's own library."""
    if fmt == "delta":
        from deltalake import DeltaTable

        data = DeltaTable(str(storage_dir / "types")).to_pyarrow_table()
    else:
        from workers.sinks.iceberg import IcebergSink

        data = IcebergSink(Storage(str(storage_dir)), Settings(table_format=fmt)
                           ).load("types").scan().to_arrow()
    return sorted(zip(data["id"].to_pylist(), data["u"].to_pylist(), strict=True))


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_a_uint64_over_the_long_range_is_refused_at_append_to_a_lake_table(any_redis,
                                                                           storage_dir, fmt):
    """Neither Delta Lake nor Iceberg has unsigned integers: a uint64 column is a long, so a
    value over 2**63-1 is refused up front with the fix; values that fit are written."""
    p = Producer(client=any_redis, settings=Settings(table_format=fmt))
    p.append("types", pa.table({"id": [0, 1], "u": pa.array([1, 2**63 - 1], pa.uint64())}))
    for bad in (pa.array([3, 2**63], pa.uint64()),
                pa.array([5, 2**64 - 1], pa.uint64()).dictionary_encode()):
        with pytest.raises(UnsupportedType, match=r"column 'u' \(uint64\): it holds "
                           rf"{bad.to_pylist()[1]}, over 9223372036854775807.*no unsigned "
                           r"integers.*Fix: append such values as decimal128\(20, 0\)"):
            p.append("types", pa.table({"id": [2, 3], "u": bad}))
    nested = pa.table({"id": [4], "u": pa.array([1], pa.uint64()),
                       "n": pa.array([{"x": [2**63]}], pa.struct([("x", pa.list_(pa.uint64()))]))})
    with pytest.raises(UnsupportedType, match=r"column 'n.x\[\]' \(uint64\)"):
        p.append("types", nested)
    assert any_redis.xlen(K.delta) == 1  # nothing of the refused batches was written
    assert Flusher(any_redis, Storage(str(storage_dir)), Settings(table_format=fmt)
                   ).flush("types").rows == 2
    assert lake_ids_and_u(fmt, storage_dir) == [(0, 1), (1, 2**63 - 1)]
    # a parquet table keeps uint64 whole
    Producer(client=any_redis, settings=Settings()).append(
        "plain", pa.table({"u": pa.array([2**64 - 1], pa.uint64())}))


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_a_foreign_uint64_over_the_long_range_becomes_a_dead_letter(any_redis, storage_dir,
                                                                     fmt):
    """A producer in another language appends without the check: the flush sets that entry
    aside with the reason (no crash, no stuck table, nothing lost) and lands the others;
    a read leaves it out as the flush does."""
    settings = Settings(table_format=fmt)
    p = Producer(client=any_redis, settings=settings)
    p.append("types", pa.table({"id": [0], "u": pa.array([1], pa.uint64())}))
    bad = pa.table({"id": [1], "u": pa.array([2**63], pa.uint64())})
    bad_id = any_redis.xadd(K.delta, {wire.FIELD_ARROW: bytes(wire.encode_table(bad))})
    p.append("types", pa.table({"id": [2], "u": pa.array([3], pa.uint64())}))
    assert sorted(p.read("types").read_all()["id"].to_pylist()) == [0, 2]
    result = Flusher(any_redis, Storage(str(storage_dir)), settings).flush("types")
    assert result.status == "ok" and result.rows == 2 and result.dead == 1, result
    (dead,) = any_redis.xrange(K.dead)
    assert dead[1][wire.FIELD_ENTRY_ID] == bad_id
    error = dead[1][wire.FIELD_ERROR].decode()
    assert "column 'u' (uint64): it holds 9223372036854775808" in error and "Fix:" in error
    assert any_redis.xlen(K.delta) == 0
    assert lake_ids_and_u(fmt, storage_dir) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("fmt, column, named, reason", [
    ("delta", pa.array([1], pa.time64("us")), "'c' (time64[us])", "Delta Lake has no time"),
    ("delta", pa.array([{"x": 1}], pa.struct([("x", pa.time32("s"))])), "'c.x' (time32[s])",
     "Delta Lake has no time"),
    ("delta", pa.array([1], pa.duration("s")), "'c' (duration[s])", "no duration type"),
    ("iceberg", pa.array([[1]], pa.list_(pa.duration("ms"))), "'c[]' (duration[ms])",
     "Iceberg has no duration type"),
    ("iceberg", pa.array([1], pa.decimal256(40, 2)), "'c' (decimal256(40, 2))",
     "at most 38 digits"),
])
def test_types_a_lake_format_has_none_for_are_refused_at_append_and_dead_at_flush(
        any_redis, storage_dir, fmt, column, named, reason):
    """Whatever spark_compatible says: the append names the column, the reason and the fix;
    a foreign producer's entry is a dead letter with the same message (no stuck table)."""
    settings = Settings(table_format=fmt)
    p = Producer(client=any_redis, settings=settings)
    p.configure("types", spark_compatible=False)
    batch = pa.table({"id": [1], "c": column})
    with pytest.raises(UnsupportedType, match=re.escape(named) + ".*" + reason +
                       ".*or keep it in a table of format parquet"):
        p.append("types", batch)
    any_redis.xadd(K.delta, {wire.FIELD_ARROW: bytes(wire.encode_table(batch))})
    result = Flusher(any_redis, Storage(str(storage_dir)), settings).flush("types")
    assert result.status == "ok" and result.rows == 0 and result.dead == 1, result
    (dead,) = any_redis.xrange(K.dead)
    assert named in dead[1][wire.FIELD_ERROR].decode()
    # a parquet table takes it (times and durations as they are)
    plain = Producer(client=any_redis, settings=Settings())
    plain.configure("plain", spark_compatible=False)
    plain.append("plain", batch)
