"""The ``iceberg`` format: what a flush leaves in the table, read back by independent readers
(DuckDB's ``iceberg_scan``, pyiceberg, polars), and the exactly-once commit under conflicts,
zombies and catalog failures injected through the catalog seam (a catalog whose public
``commit_table`` runs a hook)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy.exc
from pyiceberg.catalog.sql import SqlCatalog

from producer import Producer, Settings, wire
from producer.errors import CatalogUnavailable, ConfigError, LeaseLost
from tests.conftest import id_batch
from tests.lake import connect, duckdb_ids, metadata_location
from tests.reliability import check_lake
from tests.seams import CommitTwice, FlushInThread, Hooked
from workers import catalog as catalogs
from workers.flusher import Flusher
from workers.sinks.iceberg import WATERMARK, IcebergSink
from workers.storage import Storage

SETTINGS = Settings(max_file_bytes=8_000, table_format="iceberg")
TABLE = "events"


class HookedCatalog(SqlCatalog):
    """pyiceberg's SQL catalog with a hook around ``commit_table`` (the catalog seam)."""

    def __init__(self, hook, **props):  # type: ignore[no-untyped-def]
        super().__init__(catalogs.CATALOG_NAME, **props)
        self.hook = hook

    def commit_table(self, table, requirements, updates):  # type: ignore[no-untyped-def]
        return self.hook(super().commit_table, table, requirements, updates)


def hooked_sink(root, hook, settings=SETTINGS) -> IcebergSink:
    storage = Storage(str(root))
    uri = catalogs.catalog_uri(settings, storage)
    catalogs.load(settings, storage)  # creates the file and the namespace
    return IcebergSink(storage, settings, catalog=HookedCatalog(
        hook, uri=uri, warehouse=catalogs.storage_location(storage, storage.root)))


def fill(producer, batches=12, rows=50, start=0) -> int:
    for i in range(batches):
        producer.append(TABLE, id_batch(start + i * rows, rows))
    return batches * rows


@pytest.fixture
def setup(any_redis, storage_dir):
    producer = Producer(client=any_redis, settings=SETTINGS)
    return any_redis, storage_dir, producer


def flusher(client, root, sink=None, settings=SETTINGS) -> Flusher:
    return Flusher(client, Storage(str(root)), settings, sink=sink)


def test_a_flush_lands_every_row_once_for_every_reader(setup, monkeypatch):
    client, root, p = setup
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")  # polars' own planner is a plugin
    total = fill(p)
    result = flusher(client, root).flush(TABLE)
    assert result.status == "ok" and result.rows == total and result.files > 1
    assert p.table_config(TABLE).format == "iceberg"
    check_lake("none (baseline, in process)", root, TABLE, range(total))
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    assert sorted(table.scan().to_arrow()["id"].to_pylist()) == list(range(total))
    import polars as pl

    frame = pl.scan_iceberg(table).select("id").collect()
    assert sorted(frame["id"].to_list()) == list(range(total))
    # the catalog and the data are where the contract says
    assert (root / "_deltaflush" / "catalog.db").exists()
    assert table.location() == f"file://{root}/{TABLE}"
    assert table.properties[WATERMARK + TABLE] == result.last_id


def test_files_carry_field_ids_and_statistics_readers_prune_with(setup):
    client, root, p = setup
    fill(p)
    flusher(client, root).flush(TABLE)
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    tasks = list(table.scan().plan_files())
    ids = {f.name: f.field_id for f in table.schema().fields}
    for task in tasks:
        schema = pq.read_schema(task.file.file_path.removeprefix("file://"))
        assert {f.name: int(f.metadata[b"PARQUET:field_id"]) for f in schema} == ids
        assert task.file.lower_bounds and task.file.upper_bounds
        assert task.file.record_count > 0 and task.file.column_sizes
    pruned = list(table.scan(row_filter="id < 10").plan_files())
    assert len(pruned) == 1 < len(tasks)  # pruned by the id bounds
    con = connect()
    plan = con.execute("EXPLAIN ANALYZE SELECT count(*) FROM iceberg_scan(?) WHERE id < 10",
                       [metadata_location(root, TABLE)]).fetchall()[0][1]
    assert "Total Files Read: 1" in plan


def test_partitioned_table_has_the_layouts_spec(setup):
    client, root, p = setup
    rows = 100
    for i in range(6):
        batch = id_batch(i * rows, rows).append_column(
            "country", pa.array(["de", "fr", None, "a/b=c"][j % 4] for j in range(rows)))
        p.append(TABLE, batch)
        if i == 0:
            p.configure(TABLE, partition_by="country", partition_time="ts:hour")
    flusher(client, root).flush(TABLE)
    check_lake("partitioned (identity + hour)", root, TABLE, range(600))
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    assert [(f.name, str(f.transform)) for f in table.spec().fields] == [
        ("country", "identity"), ("ts_hour", "hour")]
    partitions = {(t.file.partition[0]) for t in table.scan().plan_files()}
    assert partitions == {"de", "fr", None, "a/b=c"}
    con = connect()
    got = con.execute("SELECT count(*) FROM iceberg_scan(?) WHERE country = 'fr'",
                      [metadata_location(root, TABLE)]).fetchone()
    assert got == (150,)
    pruned = list(table.scan(row_filter="country = 'fr'").plan_files())
    assert {t.file.partition[0] for t in pruned} == {"fr"}


def test_schema_evolution_adds_columns_and_widens_types(setup):
    client, root, p = setup
    p.append(TABLE, pa.table({"id": pa.array([0, 1], pa.int32()),
                              "small": pa.array([1, 2], pa.uint16())}))
    f = flusher(client, root)
    f.flush(TABLE)
    p.append(TABLE, pa.table({"id": pa.array([2, 3], pa.int64()),
                              "small": pa.array([3, 4], pa.uint32()),
                              "note": pa.array(["x", "y"])}))
    f.flush(TABLE)
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    assert [(x.name, str(x.field_type)) for x in table.schema().fields] == [
        ("id", "long"), ("small", "long"), ("note", "string")]
    con = connect()
    rows = con.execute("SELECT id, small, note FROM iceberg_scan(?) ORDER BY id",
                       [metadata_location(root, TABLE)]).fetchall()
    assert rows == [(0, 1, None), (1, 2, None), (2, 3, "x"), (3, 4, "y")]


def test_timestamps_in_nanoseconds_are_kept_when_lossless(setup):
    client, root, p = setup
    p.append(TABLE, pa.table({"id": [0], "at": pa.array([1_700_000_000_000_000_000],
                                                        pa.timestamp("ns", "Europe/Paris"))}))
    assert flusher(client, root).flush(TABLE).status == "ok"
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    assert str(table.schema().find_field("at").field_type) == "timestamptz"


@pytest.mark.parametrize("column, reason", [
    (pa.array([1_700_000_000_000_000_001], pa.timestamp("ns")), "without loss"),
])  # a duration, or a uint64 over 2**63-1: refused at append, a dead letter if it gets in
#   anyway (tests/test_typepolicy.py)
def test_what_iceberg_cannot_hold_makes_the_table_stuck_with_the_reason(setup, column, reason):
    client, root, p = setup
    p.append(TABLE, pa.table({"id": [0], "bad": column}))
    result = flusher(client, root).flush(TABLE)
    assert result.status == "stuck" and reason in result.error and "'bad'" in result.error
    assert client.xlen(wire.Keys("deltaflush", TABLE).delta) == 1  # nothing trimmed


def test_a_change_iceberg_cannot_promote_makes_the_table_stuck(setup):
    client, root, p = setup
    p.append(TABLE, pa.table({"id": [0], "v": pa.array([1], pa.int32())}))
    f = flusher(client, root)
    f.flush(TABLE)
    p.append(TABLE, pa.table({"id": [1], "v": pa.array([1.5], pa.float64())}))  # int -> double
    result = f.flush(TABLE)
    assert result.status == "stuck" and "cannot take" in result.error
    assert "v: int -> double" in result.error
    assert duckdb_ids(root, TABLE) == [0]


def test_a_commit_the_table_holds_is_a_no_op_and_the_watermark_is_the_record(setup):
    client, root, p = setup
    fill(p, batches=2)
    twice = CommitTwice()
    sink = IcebergSink(Storage(str(root)), SETTINGS)

    result = flusher(client, root, Hooked(sink, commit=twice)).flush(TABLE)
    assert [c.already for c in twice.first] == [False]
    assert sink.last_committed(TABLE, TABLE) == result.last_id
    assert duckdb_ids(root, TABLE) == list(range(100))


def test_a_commit_that_meets_another_commit_looks_again_and_lands_once(setup):
    """Another writer's commit (here: a second flusher's) lands between this commit's check
    and its compare-and-set: it fails, reloads, checks again and lands on the new snapshot."""
    client, root, p = setup
    total = fill(p, batches=4)
    other = IcebergSink(Storage(str(root)), SETTINGS)
    conflicts = []

    def race(commit, table, requirements, updates):
        if not conflicts and any(type(u).__name__ == "AddSnapshotUpdate" for u in updates):
            conflicts.append(1)
            loaded = other.load(TABLE)
            with loaded.transaction() as txn:  # a compaction-like commit: moves the branch
                txn.update_snapshot().fast_append().commit()
        return commit(table, requirements, updates)

    sink = hooked_sink(root, race)
    assert flusher(client, root, sink).flush(TABLE).rows == total
    assert conflicts == [1]
    check_lake("a commit met another writer's commit (retried by looking again)", root, TABLE,
               range(total))


def test_a_flusher_frozen_between_its_check_and_its_commit_lands_nothing_twice(setup):
    """The zombie: its check found the range not held; it froze before the compare-and-set;
    its lease ran out; a successor resumed the claim, committed and trimmed it. When the
    zombie wakes, its commit fails (the branch moved), it looks again, finds the range held
    and commits nothing; its trim is fenced."""
    client, root, p = setup
    total = fill(p, batches=4)
    frozen, woken = threading.Event(), threading.Event()

    def freeze(commit, table, requirements, updates):
        if not frozen.is_set() and any(type(u).__name__ == "AddSnapshotUpdate"
                                       for u in updates):
            frozen.set()
            assert woken.wait(60)
        return commit(table, requirements, updates)

    zombie = flusher(client, root, hooked_sink(root, freeze))
    thread = FlushInThread(zombie, TABLE)
    assert frozen.wait(60)
    client.delete(wire.Keys("deltaflush", TABLE).lease)  # the zombie's lease runs out
    assert flusher(client, root).flush(TABLE).rows == total
    woken.set()
    thread.join(60)
    assert isinstance(thread.error, LeaseLost)
    check_lake("flusher frozen between its check and its commit, woken after takeover (seam)",
               root, TABLE, range(total))


def test_a_commit_whose_outcome_is_unknown_keeps_its_files_and_is_found_held(setup):
    """The catalog commits, then the connection drops before the answer: the flush fails
    as transient, keeps the files (the table lists them), and the retry finds the range
    held and only trims."""
    client, root, p = setup
    total = fill(p, batches=3)
    lost = []

    def lose_answer(commit, table, requirements, updates):
        response = commit(table, requirements, updates)
        if not lost and any(type(u).__name__ == "AddSnapshotUpdate" for u in updates):
            lost.append(1)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("connection lost"))
        return response

    broken = flusher(client, root, hooked_sink(root, lose_answer))
    with pytest.raises(CatalogUnavailable):
        broken.flush(TABLE)
    client.delete(wire.Keys("deltaflush", TABLE).lease)
    assert broken.flush(TABLE).status == "ok"
    check_lake("catalog answer lost after a commit landed (outcome unknown)", root, TABLE,
               range(total))


def test_a_catalog_that_cannot_be_reached_is_retried_and_nothing_is_trimmed(setup):
    client, root, p = setup
    total = fill(p, batches=3)
    down = [True]

    def unreachable(commit, table, requirements, updates):
        if down[0] and any(type(u).__name__ == "AddSnapshotUpdate" for u in updates):
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("could not connect"))
        return commit(table, requirements, updates)

    f = flusher(client, root, hooked_sink(root, unreachable))
    with pytest.raises(CatalogUnavailable) as info:
        f.flush(TABLE)
    assert isinstance(info.value, OSError)  # the task retries it with backoff
    keys = wire.Keys("deltaflush", TABLE)
    assert client.xlen(keys.delta) == 3 and client.exists(keys.claim)
    down[0] = False
    client.delete(keys.lease)
    assert f.flush(TABLE).rows == total
    check_lake("catalog unreachable, then back", root, TABLE, range(total))


def test_a_staged_file_removed_before_its_commit_is_written_again(setup):
    """A zombie whose staged file was taken by orphan removal must not commit a table that
    lists a missing file: the commit refuses, and the retry stages the range again."""
    client, root, p = setup
    total = fill(p, batches=2)
    sink = IcebergSink(Storage(str(root)), SETTINGS)

    def remove_first(real, staged):
        if not removed:
            removed.append(staged.files[0].temp)
            Storage(str(root)).discard(staged.files[0].temp)
        return real(staged)

    removed: list[str] = []
    with pytest.raises(FileNotFoundError, match="gone or too old"):
        flusher(client, root, Hooked(sink, commit=remove_first)).flush(TABLE)
    client.delete(wire.Keys("deltaflush", TABLE).lease)
    assert flusher(client, root, sink).flush(TABLE).rows == total
    check_lake("staged file removed before its commit (orphan guard)", root, TABLE,
               range(total))


def test_a_table_made_with_pyicebergs_blind_retries_gets_them_turned_off(setup):
    client, root, p = setup
    fill(p, batches=1)
    f = flusher(client, root)
    f.flush(TABLE)
    sink = IcebergSink(Storage(str(root)), SETTINGS)
    table = sink.load(TABLE)
    table.transaction().set_properties({"commit.retry.num-retries": "4"}).commit_transaction()
    fill(p, batches=1, start=50)
    f.flush(TABLE)
    assert sink.load(TABLE).properties["commit.retry.num-retries"] == "0"
    assert duckdb_ids(root, TABLE) == list(range(100))


def test_object_storage_needs_a_catalog_uri(tmp_path):
    settings = Settings(storage_uri="s3://bucket/prefix", table_format="iceberg")
    with pytest.raises(ConfigError, match="DELTAFLUSH_CATALOG_URI must be set"):
        catalogs.catalog_uri(settings, Storage.__new__(Storage) if False else _s3_storage())


def _s3_storage() -> Storage:
    storage = Storage.__new__(Storage)
    storage.uri, storage.local, storage.root = "s3://bucket/prefix", False, "bucket/prefix"
    return storage


def test_s3_endpoint_and_region_become_file_io_properties():
    props = catalogs.file_io_properties(
        "s3://lake/p?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1")
    assert props == {"s3.endpoint": "http://127.0.0.1:9000", "s3.region": "eu-west-1"}


def test_a_map_column_lands_with_required_keys_for_every_reader(setup):
    """Arrow map keys are never null: the Iceberg map's key field is required, and so is
    the key field of the files, which pyiceberg and DuckDB's iceberg_scan read back."""
    client, root, p = setup
    maps = pa.array([[("k", 1), ("j", None)], None, []], pa.map_(pa.string(), pa.int64()))
    p.append(TABLE, pa.table({"id": [0, 1, 2], "m": maps}))
    result = flusher(client, root).flush(TABLE)
    assert result.status == "ok", result.error
    table = IcebergSink(Storage(str(root)), SETTINGS).load(TABLE)
    m = table.schema().find_field("m").field_type
    assert str(m.key_type) == "string" and m.key_field.required and not m.value_required
    (task,) = table.scan().plan_files()
    written = pq.read_schema(task.file.file_path.removeprefix("file://")).field("m").type
    assert not written.key_field.nullable and written.item_field.nullable
    back = table.scan().to_arrow().sort_by("id")
    assert back["m"].to_pylist() == maps.to_pylist()
    con = connect()
    rows = con.execute("SELECT id, m FROM iceberg_scan(?) ORDER BY id",
                       [metadata_location(root, TABLE)]).fetchall()
    assert rows == [(0, {"k": 1, "j": None}), (1, None), (2, {})]
