"""``Producer.read``: one consistent snapshot of the lake and the delta, for every format.

Flushes run in this process (``Flusher``), on fakeredis and a real redis-server; the edge
cases: an empty table, rows only in the delta or only in the lake, a range committed to
the lake but not yet trimmed, a trim between two chunks of a read, schema evolution between
the tiers, projection and filters, dead letters, ``min_id`` and bad input.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from producer import Producer, Settings, wire
from producer import read as reading
from producer.errors import InvalidInput, NotYetVisible, UnknownTable
from producer.storage import Storage
from tests.conftest import id_batch
from workers.flusher import Flusher
from workers.sources.redis_stream import RedisStream

FORMATS = ["parquet", "iceberg", "delta"]


def producer(client: Any, root: Any, fmt: str = "parquet", table: str = "events") -> Producer:
    p = Producer(client=client, settings=Settings(storage_uri=str(root)))
    p.configure(table, format=fmt)
    return p


def flush(client: Any, root: Any, table: str = "events", **kw: Any) -> Any:
    return Flusher(client, Storage(str(root)), Settings(storage_uri=str(root), **kw)
                   ).flush(table)


def ids(p: Producer, table: str = "events", **kw: Any) -> list[int]:
    t = p.read(table, **kw).read_all()
    return sorted(t["id"].to_pylist())


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_in_the_delta_the_lake_or_both_read_exactly_once(real_redis, storage_dir, fmt):
    p = producer(real_redis, storage_dir, fmt)
    p.append("events", id_batch(0, 10))
    p.append("events", id_batch(10, 5))
    assert ids(p) == list(range(15))  # only the delta
    assert flush(real_redis, storage_dir).rows == 15
    assert real_redis.xlen(wire.Keys("deltaflush", "events").delta) == 0
    assert ids(p) == list(range(15))  # only the lake
    p.append("events", id_batch(15, 7))
    assert ids(p) == list(range(22))  # both
    reader = p.read("events")
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema.names == ["id", "ts", "name", "value"]


def test_on_fakeredis_too(fake_redis, storage_dir):
    p = producer(fake_redis, storage_dir)
    p.append("events", id_batch(0, 10))
    flush(fake_redis, storage_dir)
    p.append("events", id_batch(10, 3))
    assert ids(p) == list(range(13))


def test_a_configured_table_without_rows_reads_empty(real_redis, storage_dir):
    p = producer(real_redis, storage_dir)
    assert p.read("events").read_all().num_rows == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_range_in_the_lake_but_not_yet_trimmed_is_read_once(real_redis, storage_dir, fmt,
                                                              monkeypatch):
    """A flush that dies between its lake commit (step 4) and its trim (step 5): the range
    is in both tiers; the read takes it from one."""
    p = producer(real_redis, storage_dir, fmt)
    p.append("events", id_batch(0, 10))
    flush(real_redis, storage_dir)
    p.append("events", id_batch(10, 10))

    def dies(*args: Any, **kw: Any) -> int:
        raise ConnectionError("died before the trim")

    with monkeypatch.context() as m:
        m.setattr(RedisStream, "commit", dies)
        with pytest.raises(ConnectionError):
            flush(real_redis, storage_dir)
    keys = wire.Keys("deltaflush", "events")
    assert real_redis.xlen(keys.delta) == 1 and real_redis.exists(keys.claim)
    assert ids(p) == list(range(20))
    p.append("events", id_batch(20, 1))
    assert ids(p) == list(range(21))
    real_redis.delete(keys.lease)  # the dead flusher's lease, expired
    flush(real_redis, storage_dir)  # resumes the claim; its lake commit is a no-op
    assert ids(p) == list(range(21))


class TrimsMidRead:
    """A Redis client through which the read's ``n``-th chunk finds a flush done just
    before it: the entries it was about to read are trimmed."""

    def __init__(self, client: Any, root: Any, n: int) -> None:
        self.client, self.root, self.n = client, root, n
        self.calls = 0

    def pipeline(self, transaction: bool = True) -> Any:
        if transaction:
            self.calls += 1
            if self.calls == self.n:
                flush(self.client, self.root)
        return self.client.pipeline(transaction=transaction)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_flush_during_the_read_moves_where_the_lake_ends(real_redis, storage_dir, fmt,
                                                          monkeypatch, n):
    """A flush commits and trims the entries the read is about to read (before its first
    chunk, or between two): those come from the lake snapshot, pinned after the entries
    are read; those read and now in the lake are left out of the delta's part."""
    monkeypatch.setattr(reading, "CHUNK_ENTRIES", 1)
    p = producer(real_redis, storage_dir, fmt)
    for i in range(4):
        p.append("events", id_batch(i * 5, 5))
    flush(real_redis, storage_dir)
    for i in range(4, 8):
        p.append("events", id_batch(i * 5, 5))
    client = TrimsMidRead(real_redis, storage_dir, n)
    reader = reading.read(client, p.settings, "events")
    assert sorted(reader.read_all()["id"].to_pylist()) == list(range(40))
    assert client.calls == n  # the chunk after the flush found its entries gone: done
    assert real_redis.xlen(wire.Keys("deltaflush", "events").delta) == 0


def test_a_read_larger_than_memory_spills_to_a_file(real_redis, storage_dir, monkeypatch):
    monkeypatch.setattr(reading, "SPILL_BYTES", 1000)
    monkeypatch.setattr(reading, "CHUNK_ENTRIES", 3)
    p = producer(real_redis, storage_dir)
    for i in range(10):
        p.append("events", id_batch(i * 10, 10))
    spool = reading.Spool(1000)
    snap_ids = []
    keys = wire.Keys("deltaflush", "events")
    reading.capture(real_redis, reading.Stream("events", keys), spool)
    assert spool.spilled and spool.entries == 10
    for stream, entry_ids, payloads in spool:
        assert stream == "events" and len(entry_ids) == len(payloads)
        for payload in payloads:
            snap_ids += wire.decode_payload(payload)["id"].to_pylist()
    spool.close()
    assert snap_ids == list(range(100))
    assert ids(p) == list(range(100))


@pytest.mark.parametrize("fmt", FORMATS)
def test_columns_added_and_widened_after_the_lake_rows(real_redis, storage_dir, fmt):
    p = producer(real_redis, storage_dir, fmt)
    p.append("events", pa.table({"id": pa.array([0, 1], pa.int32()), "name": ["a", "b"]}))
    flush(real_redis, storage_dir)
    p.append("events", pa.table({"id": pa.array([2], pa.int64()), "name": ["c"],
                                 "extra": pa.array([7.5])}))
    t = p.read("events").read_all().sort_by("id")
    assert t.schema.field("id").type == pa.int64()
    assert t.column_names == ["id", "name", "extra"]
    assert t.to_pydict() == {"id": [0, 1, 2], "name": ["a", "b", "c"],
                             "extra": [None, None, 7.5]}
    # a filter on the new column works on lake rows, where it is null
    assert p.read("events", filter=pc.field("extra") > 1).read_all()["id"].to_pylist() == [2]
    assert p.read("events", filter=pc.field("extra").is_null()).read_all().num_rows == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_columns_and_filter_apply_to_both_tiers(real_redis, storage_dir, fmt):
    p = producer(real_redis, storage_dir, fmt)
    p.append("events", id_batch(0, 50))
    flush(real_redis, storage_dir)
    p.append("events", id_batch(50, 50))
    reader = p.read("events", columns=["name", "id"], filter=pc.field("value") >= 20)
    assert reader.schema.names == ["name", "id"]
    t = reader.read_all()
    assert sorted(t["id"].to_pylist()) == list(range(80, 100))
    assert set(t["name"].to_pylist()) == {f"x{i}" for i in range(80, 100)}
    assert ids(p, filter=pc.field("id") < 3) == [0, 1, 2]


def test_a_partitioned_parquet_table_reads_its_partition_columns(real_redis, storage_dir):
    p = producer(real_redis, storage_dir)
    p.append("events", pa.table({"id": [0, 1, 2], "country": ["de", None, "us/ca"]}))
    p.configure("events", partition_by=["country"])
    flush(real_redis, storage_dir)
    p.append("events", pa.table({"id": [3], "country": ["fr"]}))
    t = p.read("events").read_all().sort_by("id")
    assert t.column_names == ["id", "country"]
    assert t["country"].to_pylist() == ["de", None, "us/ca", "fr"]
    de = p.read("events", filter=pc.field("country") == "de").read_all()
    assert de["id"].to_pylist() == [0]


def test_the_delta_rows_get_the_types_the_files_get(real_redis, storage_dir):
    """A spark_compatible table writes nanoseconds as microseconds: so do its reads of the
    delta, and the two tiers read as one table."""
    p = producer(real_redis, storage_dir)
    ts = pa.array([1_700_000_000_123_456_789], pa.timestamp("ns"))
    p.append("events", pa.table({"id": [0], "ts": ts}))
    flush(real_redis, storage_dir)
    p.append("events", pa.table({"id": [1], "ts": ts}))
    t = p.read("events").read_all().sort_by("id")
    assert t.schema.field("ts").type == pa.timestamp("us")
    assert t["ts"][0] == t["ts"][1]


def test_dead_letters_are_left_out_as_a_flush_leaves_them(real_redis, storage_dir):
    p = producer(real_redis, storage_dir)
    p.append("events", id_batch(0, 3))
    keys = wire.Keys("deltaflush", "events")
    real_redis.xadd(keys.delta, {"arrow": b"not arrow"})
    p.append("events", id_batch(3, 3))
    assert ids(p) == list(range(6))
    flush(real_redis, storage_dir)
    assert real_redis.xlen(keys.dead) == 1
    assert ids(p) == list(range(6))


def test_min_id_read_your_writes_and_one_not_visible(real_redis, storage_dir):
    p = producer(real_redis, storage_dir)
    entry = p.append("events", id_batch(0, 3))
    assert ids(p, min_id=entry) == [0, 1, 2]
    flush(real_redis, storage_dir)
    assert ids(p, min_id=entry) == [0, 1, 2]  # in the lake now
    ms, _ = wire.parse_id(entry)
    with pytest.raises(NotYetVisible, match="not visible after 0.2 s"):
        p.read("events", min_id=f"{ms + 3_600_000}-0", timeout_s=0.2)


def test_bad_input_is_refused_clearly(real_redis, storage_dir):
    p = producer(real_redis, storage_dir)
    p.append("events", id_batch(0, 3))
    with pytest.raises(UnknownTable, match="did you mean 'events'"):
        p.read("event")
    with pytest.raises(InvalidInput, match="has no column 'nope'"):
        p.read("events", columns=["id", "nope"])
    with pytest.raises(InvalidInput, match="selects nothing"):
        p.read("events", columns=[])
    with pytest.raises(InvalidInput, match="pyarrow.compute.Expression"):
        p.read("events", filter="id > 3")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not what append returns"):
        p.read("events", min_id="yesterday")


@pytest.mark.parametrize("fmt", FORMATS)
def test_partitioned_lake_tables_read_their_columns_not_the_time_bucket(real_redis,
                                                                        storage_dir, fmt):
    p = producer(real_redis, storage_dir, fmt)
    p.append("events", id_batch(0, 6).append_column("country", pa.array(["de", "fr"] * 3)))
    p.configure("events", partition_by=["country"], partition_time="ts:day:event_date")
    flush(real_redis, storage_dir)
    p.append("events", id_batch(6, 2).append_column("country", pa.array(["de", None])))
    t = p.read("events").read_all().sort_by("id")
    assert t.column_names == ["id", "ts", "name", "value", "country"]
    assert t["country"].to_pylist() == ["de", "fr", "de", "fr", "de", "fr", "de", None]
    assert ids(p, filter=pc.field("country") == "de") == [0, 2, 4, 6]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_dataset_of_a_snapshot_scans_again_and_again(real_redis, storage_dir, fmt):
    import duckdb

    p = producer(real_redis, storage_dir, fmt)
    p.append("events", id_batch(0, 5))
    flush(real_redis, storage_dir)
    p.append("events", id_batch(5, 5))
    events = p.dataset("events")
    con = duckdb.connect()
    con.register("events", events)
    assert con.sql("select count(*) from events a join events b on a.id = b.id"
                   ).fetchone() == (10,)
    assert sorted(events.to_table(columns=["id"])["id"].to_pylist()) == list(range(10))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sharded_table_reads_every_shard_each_with_its_watermark(real_redis, storage_dir,
                                                                   fmt, monkeypatch):
    p = producer(real_redis, storage_dir, fmt)
    p.configure("events", shards=3)
    for i in range(9):  # round-robin: three batches in each shard
        p.append("events", id_batch(i * 4, 4))
    flusher = Flusher(real_redis, Storage(str(storage_dir)),
                      Settings(storage_uri=str(storage_dir)))
    assert flusher.flush("events", shard=1).rows == 12  # one shard in the lake, two not
    assert ids(p) == list(range(36))
    for i in range(9, 12):
        p.append("events", id_batch(i * 4, 4))

    def dies(*args: Any, **kw: Any) -> int:
        raise ConnectionError("died before the trim")

    with monkeypatch.context() as m:  # shard 2 in the lake, not trimmed
        m.setattr(RedisStream, "commit", dies)
        with pytest.raises(ConnectionError):
            flusher.flush("events", shard=2)
    assert ids(p) == list(range(48))
    real_redis.delete(wire.Keys("deltaflush", "events", 2).lease)
    flusher.flush_shards("events")
    assert all(real_redis.xlen(wire.Keys("deltaflush", "events", s).delta) == 0
               for s in range(3))
    assert ids(p) == list(range(48))
    p.append("events", id_batch(48, 2))
    entry = p.append("events", id_batch(50, 2))  # "<shard>:<ms>-<seq>"
    assert ids(p, min_id=entry) == list(range(52))
    shard, _, own = entry.partition(":")
    ms, _ = wire.parse_id(own)
    with pytest.raises(NotYetVisible):
        p.read("events", min_id=f"{shard}:{ms + 3_600_000}-0", timeout_s=0.1)


def test_a_sharded_table_on_a_redis_cluster_reads_across_its_masters(redis_cluster,
                                                                    cluster_prefix,
                                                                    storage_dir):
    settings = Settings(redis_url=redis_cluster.url, key_prefix=cluster_prefix,
                        storage_uri=str(storage_dir), broker_url="memory://")
    p = Producer(settings=settings)
    p.configure("events", shards=4)
    masters = {redis_cluster.master_of(wire.Keys(cluster_prefix, "events", i).delta).port
               for i in range(4)}
    assert len(masters) >= 2, "the 4 shards all hash to one master"
    for i in range(8):
        p.append("events", id_batch(i * 10, 10))
    Flusher(p.redis, Storage(str(storage_dir)), settings).flush("events", shard=1)
    p.append("events", id_batch(80, 10))
    assert ids(p) == list(range(90))
    p.close()


#: Columns of ``tests.test_layout.ALL_TYPES`` a format cannot hold (its flush refuses them,
#: or its append: ``u64`` holds 2**63, over the long a lake table writes uint64 as).
CANNOT_HOLD = {
    "parquet": set(),
    "iceberg": {"dec256", "time64ns", "ts_ns", "tstz_ns", "u64",
                *(f"dur_{u}" for u in ("s", "ms", "us", "ns"))},
    "delta": {"dec256", "time32s", "time32ms", "time64us", "time64ns", "u64",
              *(f"dur_{u}" for u in ("s", "ms", "us", "ns"))},
}


@pytest.mark.parametrize("fmt", sorted(CANNOT_HOLD))
def test_every_type_reads_back_the_same_from_both_tiers(real_redis, storage_dir, fmt):
    from tests.test_layout import ALL_TYPES

    data = ALL_TYPES.drop_columns(sorted(CANNOT_HOLD[fmt]))
    p = producer(real_redis, storage_dir, fmt)
    p.configure("events", spark_compatible=False)
    p.append("events", data)
    assert flush(real_redis, storage_dir).rows == 3
    if fmt == "delta":  # independent readers take every column of the table
        from deltalake import DeltaTable

        from tests.delta_readers import duckdb_delta

        uri = str(storage_dir / "events")
        lake = DeltaTable(uri).to_pyarrow_table()
        assert set(lake.column_names) == set(data.column_names) - {"null"}
        assert lake["fbin"].to_pylist() == data["fbin"].to_pylist()
        assert len(duckdb_delta().execute(f"SELECT * FROM delta_scan('{uri}')").fetchall()) == 3
    p.append("events", data)
    t = p.read("events").read_all()
    assert t.column_names == data.column_names
    for name in data.column_names:
        want = data[name]
        if fmt == "delta" and pa.types.is_timestamp(want.type):  # Delta's unit: digits
            want = want.cast(pa.timestamp("us", want.type.tz), safe=False)  # below it go
        assert t[name].to_pylist() == want.to_pylist() * 2, name
