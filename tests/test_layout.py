"""Table layout: partitioning, sort order, codecs, and every Arrow type through the pipeline."""

import datetime as dt
import decimal
import json

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from producer import ConfigError, Producer, Settings, TableConfig, wire
from producer.errors import LayoutLocked
from tests import seams
from tests.conftest import id_batch
from tests.reliability import check
from workers.cli import main
from workers.flusher import Flusher
from workers.layout import HIVE_NULL, escape
from workers.storage import Storage


def events(start, rows):
    countries = ["de", "fr", None, "us/ca"]
    return pa.table({
        "id": pa.array(range(start, start + rows), pa.int64()),
        "country": pa.array([countries[i % 4] for i in range(start, start + rows)]),
        "ts": pa.array([dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
                        + dt.timedelta(hours=7 * i) for i in range(start, start + rows)],
                       pa.timestamp("us", tz="UTC")),
        "value": pa.array([float((i * 7919) % 1000) for i in range(start, start + rows)]),
    })


def flush_all(client, root, **kw):
    return Flusher(client, Storage(str(root)), Settings(**kw)).flush("events")


def test_partitioned_flush_writes_hive_folders_read_back_by_pyarrow_and_duckdb(
        any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 10))
    p.configure("events", partition_by=["country"], partition_time="ts:day:event_date")
    for i in range(1, 8):
        p.append("events", events(i * 10, 10))
    result = flush_all(any_redis, storage_dir)
    assert result.rows == 80
    folders = {path.parent.relative_to(storage_dir / "events").as_posix()
               for path in (storage_dir / "events").rglob("*.parquet")}
    assert "country=de/event_date=2026-11-24" in folders
    assert f"country={HIVE_NULL}/event_date=2026-11-24" in folders
    assert "country=us%2Fca/event_date=2026-11-24" in folders
    assert result.files == len(folders)  # one file per partition the flush touched
    data = ds.dataset(str(storage_dir / "events"), partitioning="hive")
    table = data.to_table()
    assert sorted(table["id"].to_pylist()) == list(range(80))
    check("partitioned flush (columns + time bucket)", storage_dir, "events", range(80))
    # partition pruning: a filter on the partition column reads only matching files
    de = list(data.get_fragments(filter=ds.field("country") == "de"))
    assert de and all("country=de/" in f.path for f in de)
    assert len(de) < result.files
    n = duckdb.connect().execute(
        f"select count(*) from read_parquet('{storage_dir}/events/**/*.parquet', "
        "hive_partitioning=true) where country = 'fr'").fetchone()[0]
    assert n == 20


def test_sort_order_and_codec_options_reach_the_files(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 50))
    p.configure("events", sort_by="value,id", compression="gzip", compression_level=5,
                row_group_rows=10, dictionary=False, statistics=False)
    p.append("events", events(50, 50))
    flush_all(any_redis, storage_dir)
    (path,) = (storage_dir / "events").glob("*.parquet")
    md = pq.read_metadata(path)
    assert md.num_row_groups == 10
    col = md.row_group(0).column(0)
    assert col.compression == "GZIP" and not col.is_stats_set
    values = pq.read_table(path)["value"].to_pylist()
    assert values == sorted(values)


@pytest.mark.parametrize("dictionary,dict_columns", [
    ("auto", {"name"}), (True, {"id", "ts", "name", "value"}), (False, set())])
def test_dictionary_encoding_by_default_only_for_strings(any_redis, storage_dir, dictionary,
                                                         dict_columns):
    p = Producer(client=any_redis, settings=Settings())
    if dictionary != "auto":
        p.configure("events", dictionary=dictionary)
    assert p.table_config("events").dictionary == dictionary
    p.append("events", id_batch(0, 100))
    flush_all(any_redis, storage_dir)
    (path,) = (storage_dir / "events").glob("*.parquet")
    rg = pq.read_metadata(path).row_group(0)
    encoded = {rg.column(i).path_in_schema for i in range(rg.num_columns)
               if "RLE_DICTIONARY" in rg.column(i).encodings}
    assert encoded == dict_columns


@pytest.mark.parametrize("codec", ["zstd", "snappy", "gzip", "lz4", "none"])
def test_every_codec_is_readable_by_duckdb(any_redis, storage_dir, codec):
    p = Producer(client=any_redis, settings=Settings())
    p.configure("events", compression=codec)
    p.append("events", id_batch(0, 100))
    flush_all(any_redis, storage_dir)
    n = duckdb.connect().execute(
        f"select count(*) from read_parquet('{storage_dir}/events/*.parquet')").fetchone()[0]
    assert n == 100


@pytest.mark.parametrize("changes,message", [
    ({"colour": "red"}, "unknown table setting"),
    ({"compression": "rar"}, "not one of"),
    ({"compression": "snappy", "compression_level": 3}, "takes no compression_level"),
    ({"partition_time": "ts:week"}, "bucket one of"),
    ({"partition_by": "nope"}, "has no column 'nope'"),
    ({"partition_time": "value:day"}, "needs a timestamp column"),
    ({"row_group_rows": "many"}, "row_group_rows='many' is not valid"),
    ({"dictionary": "sometimes"}, "dictionary=.sometimes. is not valid"),
])
def test_invalid_table_settings_are_refused_clearly(any_redis, changes, message):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 1))
    with pytest.raises(ConfigError, match=message):
        p.configure("events", **changes)
    assert p.table_config("events") == TableConfig()


def test_resumed_claim_keeps_the_layout_it_started_with(any_redis, storage_dir):
    """A crash before the commit: a layout change is refused while the claim waits, and a
    codec change does not reach the resumed files: the retry rewrites the same files."""
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 40))
    p.configure("events", partition_by="country")
    with pytest.raises(KeyboardInterrupt):
        seams.flusher(any_redis, storage_dir, source={"commit": seams.crash}).flush("events")
    before = sorted(p.relative_to(storage_dir).as_posix()
                    for p in storage_dir.rglob("*.parquet"))
    with pytest.raises(LayoutLocked, match="waits to be resumed"):
        p.configure("events", partition_by="")
    p.configure("events", compression="gzip")
    assert Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events").files == 4
    after = sorted(p.relative_to(storage_dir).as_posix() for p in storage_dir.rglob("*.parquet"))
    assert before == after
    assert {pq.read_metadata(path).row_group(0).column(0).compression
            for path in storage_dir.rglob("*.parquet")} == {"ZSTD"}
    check("crash before commit, then a layout change (resumed)", storage_dir, "events",
          range(40))


def test_table_set_and_show_cli(redis_server, real_redis, storage_dir):
    env = {"DELTAFLUSH_REDIS_URL": redis_server.url}
    out = CliRunner().invoke(main, ["table", "set", "events", "--create", "--partition-by",
                                    "country", "--sort-by", "id", "--compression", "snappy",
                                    "--flush-interval", "5"], env=env)
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["table", "show", "events", "--json"], env=env)
    shown = json.loads(out.output)["config"]
    assert shown["partition_by"] == ["country"] and shown["flush_interval_s"] == 5.0
    out = CliRunner().invoke(main, ["table", "set", "events", "--compression", "rar"], env=env)
    assert out.exit_code == 2 and "not one of" in out.output


def test_hive_escaping():
    assert escape("a/b=c%d") == "a%2Fb%3Dc%25d"
    assert escape("plain-value_1.0") == "plain-value_1.0"


ALL_TYPES = pa.table({
    "i8": pa.array([1, None, -3], pa.int8()),
    "i16": pa.array([1, None, -3], pa.int16()),
    "i32": pa.array([1, None, -3], pa.int32()),
    "i64": pa.array([1, None, -3], pa.int64()),
    "u8": pa.array([1, None, 3], pa.uint8()),
    "u16": pa.array([1, None, 3], pa.uint16()),
    "u32": pa.array([1, None, 3], pa.uint32()),
    "u64": pa.array([1, None, 2**63], pa.uint64()),
    "f32": pa.array([1.5, None, -2.0], pa.float32()),
    "f64": pa.array([1.5, None, float("inf")], pa.float64()),
    "dec": pa.array([decimal.Decimal("1.23"), None, decimal.Decimal("-4.56")],
                    pa.decimal128(10, 2)),
    "dec256": pa.array([decimal.Decimal("1.23"), None, decimal.Decimal("-4.56")],
                       pa.decimal256(40, 2)),
    "bool": pa.array([True, None, False]),
    "str": pa.array(["a", None, "ü"]),
    "lstr": pa.array(["a", None, "b"], pa.large_string()),
    "bin": pa.array([b"\x00", None, b"z"]),
    "lbin": pa.array([b"\x00", None, b"z"], pa.large_binary()),
    "fbin": pa.array([b"ab", None, b"cd"], pa.binary(2)),
    "date32": pa.array([dt.date(2026, 11, 24), None, dt.date(1970, 1, 1)], pa.date32()),
    "date64": pa.array([dt.date(2026, 11, 24), None, dt.date(1970, 1, 1)], pa.date64()),
    "time32s": pa.array([1, None, 3], pa.time32("s")),
    "time32ms": pa.array([1, None, 3], pa.time32("ms")),
    "time64us": pa.array([1, None, 3], pa.time64("us")),
    "time64ns": pa.array([1, None, 3], pa.time64("ns")),
    **{f"ts_{u}": pa.array([1, None, 3], pa.timestamp(u)) for u in ("s", "ms", "us", "ns")},
    **{f"tstz_{u}": pa.array([1, None, 3], pa.timestamp(u, tz="America/New_York"))
       for u in ("s", "ms", "us", "ns")},
    **{f"dur_{u}": pa.array([1, None, -3], pa.duration(u)) for u in ("s", "ms", "us", "ns")},
    "dict": pa.array(["a", None, "a"]).dictionary_encode(),
    "list": pa.array([[1, 2], None, []], pa.list_(pa.int64())),
    "llist": pa.array([[1], None, [2, None]], pa.large_list(pa.int32())),
    "struct": pa.array([{"x": 1, "y": "a"}, None, {"x": None, "y": "b"}]),
    "map": pa.array([[("k", 1)], None, []], pa.map_(pa.string(), pa.int64())),
    "nested": pa.array([[{"a": [1]}], None, [{"a": None}]]),
    "null": pa.nulls(3),
})


#: Parquet has no date64, no second-precision time or timestamp: these come back as the
#: nearest Parquet type holding the very same values. A dictionary is an encoding, not part
#: of a table's schema (docs/spec.md): it lands as its values' type (and Parquet
#: dictionary-encodes string columns itself).
PARQUET_NEAREST = {"date64": pa.date32(), "time32s": pa.time32("ms"),
                   "ts_s": pa.timestamp("ms"), "tstz_s": pa.timestamp("ms", "America/New_York"),
                   "dict": pa.string()}


def test_every_type_round_trips_with_its_exact_type(any_redis, storage_dir):
    """Without spark_compatible (see tests/test_typepolicy.py for the default)."""
    p = Producer(client=any_redis, settings=Settings())
    p.configure("types", spark_compatible=False)
    p.append("types", ALL_TYPES)
    Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("types")
    (path,) = (storage_dir / "types").glob("*.parquet")
    back = pq.read_table(path)
    for name in ALL_TYPES.column_names:
        want = PARQUET_NEAREST.get(name, ALL_TYPES.schema.field(name).type)
        assert back.schema.field(name).type == want, name
        assert back[name].to_pylist() == ALL_TYPES[name].to_pylist(), name
    # DuckDB reads every column of the file
    row = duckdb.connect().execute(f"select * from read_parquet('{path}')").fetchall()
    assert len(row) == 3 and len(row[0]) == ALL_TYPES.num_columns
    assert wire.schema_from_canonical(any_redis.get(wire.Keys("deltaflush", "types").schema)) \
        == wire.normalize(ALL_TYPES.schema)
