"""Layout changes on a table that has files (``producer.admin``): a change of partitioning
or ``spark_compatible`` is refused, race-free; every other setting may change, and every
reader keeps reading every row exactly once with the README's queries."""

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest

from producer import Producer, Settings, admin, wire
from producer.errors import LayoutLocked
from tests.test_layout import events
from workers.flusher import Flusher
from workers.lease import acquire
from workers.storage import Storage

K = wire.Keys("deltaflush", "events")


def flush(client, storage_dir):
    return Flusher(client, Storage(str(storage_dir)), Settings()).flush("events")


def read_ids_every_way(root) -> dict[str, list[int]]:
    """The ``id`` column as each reader the README names reads the table (Spark aside)."""
    path = root / "events"
    glob = f"{path}/**/*.parquet"
    return {
        "pyarrow": ds.dataset(str(path), partitioning="hive").to_table(columns=["id"])[
            "id"].to_pylist(),
        "duckdb": [r[0] for r in duckdb.connect().execute(
            f"select id from read_parquet('{glob}', hive_partitioning=true)").fetchall()],
        "polars": pl.scan_parquet(glob, hive_partitioning=True).select("id").collect()[
            "id"].to_list(),
    }


def assert_every_reader_reads(root, expected: int) -> None:
    for reader, ids in read_ids_every_way(root).items():
        assert sorted(ids) == list(range(expected)), reader


@pytest.mark.parametrize("first,change", [
    ({}, {"partition_by": "country"}),
    ({}, {"partition_time": "ts:day:event_date"}),
    ({"partition_by": "country"}, {"partition_by": ""}),
    ({"partition_by": "country"}, {"partition_time": "ts:month"}),
    ({}, {"spark_compatible": False}),
])
def test_a_layout_change_of_a_table_with_files_is_refused_and_readers_keep_working(
        any_redis, storage_dir, first, change):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 40))
    if first:
        p.configure("events", **first)
    flush(any_redis, storage_dir)
    before = p.table_config("events")
    with pytest.raises(LayoutLocked) as err:
        p.configure("events", **change)
    message = str(err.value)
    assert "flushed files" in message and "new table" in message
    assert "DuckDB" in message and "Spark" in message  # why
    assert p.table_config("events") == before  # nothing changed
    # every other setting stays changeable, and the readers read every row once
    p.configure("events", sort_by="value", compression="gzip", row_group_rows=7)
    p.append("events", events(40, 40))
    flush(any_redis, storage_dir)
    assert_every_reader_reads(storage_dir, 80)


def test_layout_may_change_before_the_first_flush(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 40))
    p.configure("events", partition_by="country")
    p.configure("events", partition_by="", partition_time="ts:day")
    flush(any_redis, storage_dir)
    assert all("ts_day=" in str(path) for path in storage_dir.rglob("*.parquet"))
    assert_every_reader_reads(storage_dir, 40)


def test_a_layout_change_is_refused_while_a_flush_holds_the_lease(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 4))
    lease = acquire(any_redis, K, 30_000)
    assert lease is not None
    with pytest.raises(LayoutLocked, match="is running"):
        p.configure("events", partition_by="country")
    p.configure("events", compression="snappy")  # not a layout change: fine
    any_redis.delete(K.lease)
    p.configure("events", partition_by="country")


def test_a_flush_starting_between_the_check_and_the_write_makes_it_refuse(any_redis,
                                                                          monkeypatch):
    """The check and the write are one WATCH/MULTI transaction over the lease: a lease
    taken after the check read it aborts the write, and the retried check refuses."""
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 4))
    original = admin._check_layout_change
    took: list[object] = []

    def check_then_a_flush_starts(pipe, *args):
        original(pipe, *args)  # finds no lease...
        if not took:
            took.append(acquire(any_redis, K, 30_000))  # ...and a flush starts right now

    monkeypatch.setattr(admin, "_check_layout_change", check_then_a_flush_starts)
    with pytest.raises(LayoutLocked, match="is running"):
        p.configure("events", partition_by="country")
    assert took[0] is not None
    assert p.table_config("events").partition_by == ()


def test_the_readmes_way_to_re_partition_copies_every_row_once(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", events(0, 40))
    p.configure("events", partition_by="country")
    flush(any_redis, storage_dir)
    # README, "Changing a table's layout"
    p.configure("events_v2", partition_time="ts:day:event_date")
    old = ds.dataset(str(storage_dir / "events"), partitioning="hive")
    p.append_many("events_v2", (b for b in old.to_batches(batch_size=100_000)
                                if b.num_rows))
    Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events_v2")
    copied = ds.dataset(str(storage_dir / "events_v2"), partitioning="hive").to_table()
    assert sorted(copied["id"].to_pylist()) == list(range(40))
    assert sorted(copied["country"].drop_null().unique().to_pylist()) == ["de", "fr", "us/ca"]
