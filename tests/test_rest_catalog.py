"""The ``iceberg`` format through an Iceberg REST catalog (``DELTAFLUSH_CATALOG_URI=http://``):
deltaflush's own code path (pyiceberg's ``RestCatalog`` over HTTP) against the tests' REST
catalog server (``tests/rest_catalog.py``, a separate process following the Iceberg REST
spec, its commit a check of the request's requirements and a swap under one lock).

Every test reads the table back with readers that do not go through deltaflush: DuckDB's
``iceberg_scan`` of the metadata file the catalog names over plain HTTP, and pyiceberg's
``RestCatalog`` of its own; each id must be there exactly once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.exceptions import CommitFailedException

from producer import Producer, Settings, wire
from producer.errors import CatalogUnavailable, LeaseLost
from tests.conftest import id_batch, wait_for
from tests.lake import RestCatalogServer, rest_catalog  # noqa: F401 - the fixture
from tests.reliability import check_ids
from tests.seams import CommitTwice, FlushInThread, Hooked
from tests.test_maintenance import flush_while_compacting
from workers import catalog as catalogs
from workers import maintenance
from workers.flusher import Flusher
from workers.sinks.iceberg import WATERMARK, IcebergSink
from workers.storage import Storage

TABLE = "events"


@pytest.fixture
def settings(rest_catalog: RestCatalogServer) -> Settings:  # noqa: F811
    return Settings(max_file_bytes=8_000, table_format="iceberg",
                    catalog_uri=rest_catalog.uri)


@pytest.fixture
def producer(real_redis, settings):
    p = Producer(client=real_redis, settings=settings)
    yield p
    p.close()


def fill(producer: Producer, batches: int = 12, rows: int = 50, start: int = 0) -> int:
    for i in range(batches):
        producer.append(TABLE, id_batch(start + i * rows, rows))
    return batches * rows


def flusher(client, root: Path, settings: Settings, sink=None) -> Flusher:
    return Flusher(client, Storage(str(root)), settings, sink=sink)


def reader(server: RestCatalogServer) -> RestCatalog:
    """pyiceberg's REST client of the test's own (not deltaflush's catalog loader)."""
    return RestCatalog("reader", uri=server.uri)


def check(fault: str, server: RestCatalogServer, expected: range) -> None:
    """Every id once, for DuckDB (the metadata file named by a plain HTTP load) and for
    pyiceberg (a REST client of its own)."""
    check_ids(f"iceberg (REST catalog): {fault}", server.duckdb_ids(TABLE), expected, None,
              str)
    table = reader(server).load_table(("deltaflush", TABLE))
    ids = sorted(table.scan().to_arrow()["id"].to_pylist())
    assert ids == list(expected), f"pyiceberg over REST: {fault}"


class HookedRest(RestCatalog):
    """pyiceberg's REST catalog with a hook around ``commit_table`` (the catalog seam)."""

    def __init__(self, hook, **props):  # type: ignore[no-untyped-def]
        super().__init__(catalogs.CATALOG_NAME, **props)
        self.hook = hook

    def commit_table(self, table, requirements, updates):  # type: ignore[no-untyped-def]
        return self.hook(super().commit_table, table, requirements, updates)


def hooked_sink(root: Path, settings: Settings, hook) -> IcebergSink:
    storage = Storage(str(root))
    catalogs.load(settings, storage)  # the namespace
    return IcebergSink(storage, settings, catalog=HookedRest(
        hook, uri=settings.catalog_uri,
        warehouse=catalogs.storage_location(storage, storage.root)))


def appends(updates) -> bool:
    return any(type(u).__name__ == "AddSnapshotUpdate" for u in updates)


def another_writer_first(when: Callable[[Any, Any], bool], write: Callable[[], None]
                         ) -> tuple[Callable[..., Any], list[str]]:
    """A ``commit_table`` hook for ``hooked_sink``: at the first commit for which
    ``when(requirements, updates)`` holds, another writer gets in first (``write()``); the
    catalog's refusal of the commit then (``CommitFailedException``) is recorded in the
    list returned with the hook, and raised."""
    refused: list[str] = []

    def race(commit, table, requirements, updates):
        if not refused and when(requirements, updates):
            write()
            try:
                return commit(table, requirements, updates)
            except CommitFailedException as exc:
                refused.append(str(exc))
                raise
        return commit(table, requirements, updates)

    return race, refused


# --- what a flush leaves --------------------------------------------------------------

def test_a_flush_through_the_rest_catalog_lands_every_row_once(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    total = fill(producer)
    result = flusher(real_redis, storage_dir, settings).flush(TABLE)
    assert result.status == "ok" and result.rows == total and result.files > 1
    check("none (baseline)", rest_catalog, range(total))
    # the REST catalog holds the table: no SQLite catalog was made in the storage root
    assert not (storage_dir / "_deltaflush" / "catalog.db").exists()
    assert rest_catalog.get("namespaces/deltaflush/tables")[1] == {
        "identifiers": [{"namespace": ["deltaflush"], "name": TABLE}]}
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert table.location() == f"file://{storage_dir}/{TABLE}"
    assert table.metadata_location.startswith(f"file://{storage_dir}/{TABLE}/metadata/")
    assert table.properties[WATERMARK + TABLE] == result.last_id
    assert table.properties["commit.retry.num-retries"] == "0"
    summary = table.current_snapshot().summary
    assert summary["deltaflush.last-id"] == result.last_id


def test_a_table_partitioned_by_day(real_redis, storage_dir, settings, producer,
                                    rest_catalog):  # noqa: F811
    rows, day_us = 100, 86_400_000_000
    for i in range(6):  # two rows per day, over many days
        batch = id_batch(i * rows, rows)
        batch = batch.set_column(1, "ts", pa.array(
            [1_699_920_000_000_000 + (i * rows + j) * day_us // 2  # from a midnight
             for j in range(rows)],
            pa.timestamp("us", tz="UTC")))
        producer.append(TABLE, batch)
        if i == 0:
            producer.configure(TABLE, partition_time="ts:day")
    assert flusher(real_redis, storage_dir, settings).flush(TABLE).rows == 600
    check("partitioned by day", rest_catalog, range(600))
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert [(f.name, str(f.transform)) for f in table.spec().fields] == [("ts_day", "day")]
    days = {t.file.partition[0] for t in table.scan().plan_files()}
    assert len(days) == 300
    from tests.lake import connect

    got = connect().execute("SELECT count(*), count(DISTINCT ts::DATE) FROM iceberg_scan(?)",
                            [rest_catalog.metadata_location(TABLE)]).fetchone()
    assert got == (600, 300)


def test_an_added_column_evolves_the_schema_through_the_catalog(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    producer.append(TABLE, pa.table({"id": pa.array([0, 1], pa.int64())}))
    f = flusher(real_redis, storage_dir, settings)
    f.flush(TABLE)
    producer.append(TABLE, pa.table({"id": pa.array([2, 3], pa.int64()),
                                     "note": pa.array(["x", "y"])}))
    assert f.flush(TABLE).status == "ok"
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert [(x.name, str(x.field_type)) for x in table.schema().fields] == [
        ("id", "long"), ("note", "string")]
    assert len(table.schemas()) == 2
    from tests.lake import connect

    rows = connect().execute("SELECT id, note FROM iceberg_scan(?) ORDER BY id",
                             [rest_catalog.metadata_location(TABLE)]).fetchall()
    assert rows == [(0, None), (1, None), (2, "x"), (3, "y")]


def test_a_table_another_writer_created_first_is_taken_and_evolved(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    """Two writers create the table at once: deltaflush's stage-create is committed with
    ``assert-create``, which the catalog refuses (409) since the other writer's table
    (pyiceberg's blind retries on, one column) landed first; deltaflush loads that table,
    turns the retries off, adds its columns and flushes into it."""
    total = fill(producer, batches=2)

    def create() -> None:
        reader(rest_catalog).create_table(
            ("deltaflush", TABLE), schema=pa.schema([pa.field("id", pa.int64())]),
            location=f"file://{storage_dir}/{TABLE}")

    race, refused = another_writer_first(
        lambda requirements, _: any(r.type == "assert-create" for r in requirements), create)
    sink = hooked_sink(storage_dir, settings, race)
    assert flusher(real_redis, storage_dir, settings, sink).flush(TABLE).rows == total
    assert len(refused) == 1 and "Table already exists" in refused[0]
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert table.schema().column_names == ["id", "ts", "name", "value"]
    assert table.properties["commit.retry.num-retries"] == "0"
    check("the table created by another writer first (assert-create refused)", rest_catalog,
          range(total))


def test_a_nested_namespace(real_redis, storage_dir, rest_catalog):  # noqa: F811
    """``DELTAFLUSH_CATALOG_NAMESPACE=analytics.raw``: the namespace's levels travel in the
    path joined by the spec's separator (``%1F``)."""
    settings = Settings(max_file_bytes=8_000, table_format="iceberg",
                        catalog_uri=rest_catalog.uri, catalog_namespace="analytics.raw")
    p = Producer(client=real_redis, settings=settings)
    total = fill(p, batches=2)
    assert flusher(real_redis, storage_dir, settings).flush(TABLE).rows == total
    status, body = rest_catalog.get("namespaces/analytics%1Fraw/tables")
    assert status == 200 and body["identifiers"] == [
        {"namespace": ["analytics", "raw"], "name": TABLE}]
    location = rest_catalog.metadata_location(TABLE, namespace="analytics%1Fraw")
    assert location is not None
    from tests.lake import scan_ids

    check_ids("iceberg (REST catalog): a nested namespace", scan_ids(location), range(total),
              None, str)
    p.close()


def test_the_producer_reads_both_tiers_through_the_catalog(real_redis, storage_dir,
                                                           rest_catalog):  # noqa: F811
    """``Producer.read``: the lake snapshot it pins comes from the REST catalog."""
    settings = Settings(storage_uri=str(storage_dir), table_format="iceberg",
                        catalog_uri=rest_catalog.uri)
    p = Producer(client=real_redis, settings=settings)
    p.append(TABLE, id_batch(0, 10))
    assert flusher(real_redis, storage_dir, settings).flush(TABLE).rows == 10
    p.append(TABLE, id_batch(10, 7))
    got = p.read(TABLE).read_all()
    assert sorted(got["id"].to_pylist()) == list(range(17))
    assert rest_catalog.metadata_location(TABLE) is not None
    assert not (storage_dir / "_deltaflush" / "catalog.db").exists()
    p.close()


# --- the exactly-once commit ------------------------------------------------------------

def test_a_commit_retried_after_it_landed_is_a_no_op(real_redis, storage_dir, settings,
                                                     producer, rest_catalog):  # noqa: F811
    fill(producer, batches=2)
    sink = IcebergSink(Storage(str(storage_dir)), settings)
    twice = CommitTwice()

    result = flusher(real_redis, storage_dir, settings, Hooked(sink, commit=twice)).flush(TABLE)
    assert [c.already for c in twice.first] == [False]
    assert sink.last_committed(TABLE, TABLE) == result.last_id
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert len(table.snapshots()) == 1
    check("a commit retried after it landed", rest_catalog, range(100))


def test_a_commit_whose_answer_is_lost_is_found_held(real_redis, storage_dir, settings,
                                                     producer, rest_catalog):  # noqa: F811
    """The catalog applies the commit, then answers 504 (a gateway timed out): pyiceberg
    raises CommitStateUnknownException, the flush fails as transient keeping its files,
    and the retry finds the range held and only trims."""
    total = fill(producer, batches=3)
    rest_catalog.faults(lose_answers=1)
    f = flusher(real_redis, storage_dir, settings)
    with pytest.raises(CatalogUnavailable, match="CommitStateUnknown"):
        f.flush(TABLE)
    assert rest_catalog.faults() == {"unavailable": 0, "lose_answers": 0, "hang": 0,
                                     "commits": 2, "stalled": 0}
    keys = wire.Keys("deltaflush", TABLE)
    assert real_redis.xlen(keys.delta) == 3  # nothing trimmed
    real_redis.delete(keys.lease)
    result = f.flush(TABLE)
    assert result.status == "ok"
    assert int(real_redis.hget(keys.stats, "lake_already") or 0) == 1
    assert rest_catalog.faults()["commits"] == 2  # the retry committed nothing
    check("the catalog's answer to a landed commit lost (504)", rest_catalog, range(total))


def test_a_catalog_briefly_unavailable_is_retried_and_nothing_is_trimmed(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    total = fill(producer, batches=3)
    rest_catalog.faults(unavailable=1)
    f = flusher(real_redis, storage_dir, settings)
    with pytest.raises(CatalogUnavailable, match="unavailable") as info:
        f.flush(TABLE)
    assert isinstance(info.value, OSError)  # the task retries it with backoff
    keys = wire.Keys("deltaflush", TABLE)
    assert real_redis.xlen(keys.delta) == 3 and real_redis.exists(keys.claim)
    real_redis.delete(keys.lease)
    assert f.flush(TABLE).rows == total
    check("the catalog answered 503 to a commit, then came back", rest_catalog, range(total))


def test_a_catalog_stuck_mid_commit_times_out_and_the_late_commit_is_found_held(
        real_redis, storage_dir, rest_catalog):  # noqa: F811
    """The catalog accepts a commit and stalls (a catalog or proxy that hangs): the flush
    gives up after the request timeout (``?timeout=`` of the URI) instead of waiting with
    the lease held, as transient with the outcome unknown; the catalog then applies the
    commit late, and the retry finds the range held and only trims."""
    settings = Settings(max_file_bytes=8_000, table_format="iceberg",
                        # long enough that no request but the stalled one times out on a
                        # loaded machine (1 s failed once at load 22)
                        catalog_uri=f"{rest_catalog.uri}?timeout=5")
    p = Producer(client=real_redis, settings=settings)
    total = fill(p, batches=3)
    rest_catalog.faults(hang=1)
    f = flusher(real_redis, storage_dir, settings)
    with pytest.raises(CatalogUnavailable, match="timed out"):
        f.flush(TABLE)
    keys = wire.Keys("deltaflush", TABLE)
    assert real_redis.xlen(keys.delta) == 3  # nothing trimmed
    assert rest_catalog.faults()["stalled"] == 1
    rest_catalog.faults(release=1)
    wait_for(lambda: rest_catalog.faults()["commits"] == 2, 30, "the stalled commit to land")
    real_redis.delete(keys.lease)
    assert f.flush(TABLE).status == "ok"
    assert int(real_redis.hget(keys.stats, "lake_already") or 0) == 1
    assert rest_catalog.faults()["commits"] == 2
    check("the catalog stalled mid-commit past the request timeout, then applied it",
          rest_catalog, range(total))
    p.close()


def test_the_server_refuses_a_commit_on_a_moved_branch_with_409(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    """The catalog's own check, by plain HTTP: a commit that requires main to be at a
    snapshot it has left is answered 409 CommitFailedException and changes nothing."""
    fill(producer, batches=1)
    f = flusher(real_redis, storage_dir, settings)
    f.flush(TABLE)
    first = reader(rest_catalog).load_table(("deltaflush", TABLE)).current_snapshot()
    fill(producer, batches=1, start=50)
    f.flush(TABLE)
    before = rest_catalog.metadata_location(TABLE)
    status, body = rest_catalog.request(
        "POST", f"v1/lake/namespaces/deltaflush/tables/{TABLE}",
        {"identifier": {"namespace": ["deltaflush"], "name": TABLE},
         "requirements": [{"type": "assert-ref-snapshot-id", "ref": "main",
                           "snapshot-id": first.snapshot_id}],
         "updates": [{"action": "set-properties", "updates": {"x": "y"}}]})
    assert status == 409 and body["error"]["type"] == "CommitFailedException"
    assert body["error"]["code"] == 409 and "main" in body["error"]["message"]
    assert rest_catalog.metadata_location(TABLE) == before
    status, body = rest_catalog.get("namespaces/deltaflush/tables/nope")
    assert status == 404 and body["error"]["type"] == "NoSuchTableException"
    status, body = rest_catalog.get("namespaces/nope/tables")
    assert status == 404 and body["error"]["type"] == "NoSuchNamespaceException"
    check("a stale commit refused by the catalog", rest_catalog, range(100))


def test_a_commit_that_meets_another_commit_gets_409_reloads_and_lands_once(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    """Another writer's commit lands between this commit's check and the catalog's
    compare-and-set: the catalog answers 409, the flush reloads, checks the watermark
    again and lands on the new snapshot."""
    total = fill(producer, batches=4)
    other = IcebergSink(Storage(str(storage_dir)), settings)

    def move_the_branch() -> None:  # a compaction-like commit
        with other.load(TABLE).transaction() as txn:
            txn.update_snapshot().fast_append().commit()

    race, refused = another_writer_first(lambda _, updates: appends(updates), move_the_branch)
    sink = hooked_sink(storage_dir, settings, race)
    result = flusher(real_redis, storage_dir, settings, sink).flush(TABLE)
    assert result.rows == total
    assert len(refused) == 1 and "CommitFailedException" in refused[0]
    assert int(real_redis.hget(wire.Keys("deltaflush", TABLE).stats, "lake_conflicts")) == 1
    check("a commit met another writer's commit (409, retried by looking again)",
          rest_catalog, range(total))


def test_a_flusher_frozen_before_its_commit_lands_nothing_twice(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    """The zombie: frozen between its check and its commit, its lease ran out and a
    successor committed the range. Woken, its commit gets 409, it looks again, finds the
    range held and commits nothing; its trim is fenced."""
    total = fill(producer, batches=4)
    frozen, woken = threading.Event(), threading.Event()

    def freeze(commit, table, requirements, updates):
        if not frozen.is_set() and appends(updates):
            frozen.set()
            assert woken.wait(60)
        return commit(table, requirements, updates)

    zombie = flusher(real_redis, storage_dir, settings, hooked_sink(storage_dir, settings,
                                                                    freeze))
    thread = FlushInThread(zombie, TABLE)
    assert frozen.wait(60)
    real_redis.delete(wire.Keys("deltaflush", TABLE).lease)  # the zombie's lease runs out
    assert flusher(real_redis, storage_dir, settings).flush(TABLE).rows == total
    woken.set()
    thread.join(60)
    assert isinstance(thread.error, LeaseLost)
    check("flusher frozen before its commit, woken after a takeover", rest_catalog,
          range(total))


# --- maintenance ----------------------------------------------------------------------

def test_compaction_expiry_and_orphan_removal_through_the_catalog(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    f = flusher(real_redis, storage_dir, settings)
    for i in range(10):
        producer.append(TABLE, id_batch(i * 50, 50))
        f.flush(TABLE)
    producer.configure(TABLE, target_file_bytes=1 << 20, compact_min_small_files=5,
                       snapshot_retention_s=0.001, orphan_retention_s=0.001)
    done = maintenance.maintain(real_redis, f, TABLE)
    assert done["compaction"]["compacted"] == 10 and done["compaction"]["written"] == 1
    assert done["expiry"]["expired"] >= 10
    assert done["orphans"]["removed"] >= 10
    table = reader(rest_catalog).load_table(("deltaflush", TABLE))
    assert len(table.snapshots()) == 1
    assert table.current_snapshot().summary["deltaflush.operation"] == "compact"
    assert table.properties[WATERMARK + TABLE] == real_redis.hget(
        wire.Keys("deltaflush", TABLE).stats, "last_id").decode()
    assert len(list((storage_dir / TABLE / "data").rglob("*.parquet"))) == 1
    check("compaction, expiry and orphan removal", rest_catalog, range(500))
    # flushes go on after maintenance (with a retention a staged file outlives)
    producer.configure(TABLE, orphan_retention_s=3600)
    producer.append(TABLE, id_batch(500, 50))
    assert f.flush(TABLE).rows == 50
    check("a flush after maintenance", rest_catalog, range(550))


def test_compaction_alongside_flushes_through_the_catalog(
        real_redis, storage_dir, settings, producer, rest_catalog):  # noqa: F811
    """Flushes commit while compactions rewrite, both through the REST catalog: each
    side's refused commit (409) looks at the table again."""
    producer.configure(TABLE, target_file_bytes=1 << 20)
    f = flusher(real_redis, storage_dir, settings)
    compactions = flush_while_compacting(real_redis, producer, f, 20,
                                         lambda: rest_catalog.duckdb_ids(TABLE))
    assert sum(compactions) > 0
    check("compaction alongside flushes", rest_catalog, range(800))


# --- a real fleet ---------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("step", ["lake.commit", "lake.committed"])
def test_a_worker_killed_around_its_commit_through_the_rest_catalog(
        step, fleet_env, fleet, producer_for, real_redis, storage_dir,
        rest_catalog):  # noqa: F811
    """``celery -A workers.app worker`` and ``beat`` processes with
    ``DELTAFLUSH_CATALOG_URI`` the REST catalog's address; the worker SIGKILLed just before
    (``lake.commit``) or just after (``lake.committed``) a catalog commit."""
    from tests.test_fleet import fill as fill_fleet
    from tests.test_fleet import wait_drained

    fleet_env.update(DELTAFLUSH_TABLE_FORMAT="iceberg", DELTAFLUSH_CATALOG_URI=rest_catalog.uri)
    p = producer_for()
    total = fill_fleet(p)
    fleet.worker(failpoints=f"{step}=kill")
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    assert (Path(fleet_env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / step).exists()
    check(f"worker process SIGKILLed at {step}", rest_catalog, range(total))
    assert not (storage_dir / "_deltaflush" / "catalog.db").exists()
    if step == "lake.committed":  # the retry found its range held and only trimmed
        stats = wire.Keys("deltaflush", TABLE).stats
        assert int(real_redis.hget(stats, "lake_already") or 0) >= 1
