"""The ``delta`` format: a flush lands a Delta table that independent readers (DuckDB's
delta extension, polars) read whole; the app transaction makes commits idempotent, racing
and zombie commits land once; staged files are guarded against vacuum and never deleted
once a commit may reference them."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from producer import Producer, Settings, wire
from producer.errors import ConfigError, LakePanic, LeaseLost
from producer.tablecfg import TableConfig
from tests.conftest import id_batch
from tests.delta_readers import deltalake_ids, duckdb_delta, duckdb_ids, polars_ids
from tests.reliability import check_delta
from tests.seams import FlushInThread, Hooked
from workers.flusher import Flusher
from workers.sinks import StageStart
from workers.sinks.delta import DeltaSink, StagedFileGone
from workers.sinks.delta_schema import (
    NotStorable,
    entry_id,
    file_schema,
    stats_json,
    table_schema,
    txn_version,
)
from workers.sinks.delta_table import Location, location, s3_options
from workers.sources import Range
from workers.status import unstick
from workers.storage import Storage
from workers.writer import Encoder

SETTINGS = Settings(max_file_bytes=8_000, table_format="delta")
K = wire.Keys("deltaflush", "events")


def fill(client, batches=12, rows=50, table="events") -> int:
    p = Producer(client=client, settings=SETTINGS)
    for i in range(batches):
        p.append(table, id_batch(i * rows, rows))
    return batches * rows


def flusher(client, root, sink=None) -> Flusher:
    return Flusher(client, Storage(str(root)), SETTINGS, sink=sink)


# --- the app-transaction record -------------------------------------------------------------


@pytest.mark.parametrize("entry", ["0-0", "1-0", "1732480000000-7", "1732480000000-2097151",
                                   "4398046511103-2097151"])
def test_a_version_stands_for_its_entry_id_and_grows_with_it(entry):
    assert entry_id(txn_version(entry)) == entry
    ms, seq = wire.parse_id(entry)
    if seq < 2**21 - 1:
        assert txn_version(wire.next_id(entry)) > txn_version(entry)
    if ms < 2**42 - 1:
        assert txn_version(f"{ms + 1}-0") > txn_version(entry)
    assert txn_version(entry) < 2**63


@pytest.mark.parametrize("entry", ["1732480000000-2097152", "4398046511104-0"])
def test_an_entry_id_that_does_not_fit_a_version_is_refused_clearly(entry):
    with pytest.raises(NotStorable, match="sequence number must be below 2097152 and its "
                       "milliseconds below 4398046511104"):
        txn_version(entry)


# --- where the table is ---------------------------------------------------------------------


def test_a_pyarrow_s3_uri_becomes_delta_rs_storage_options():
    assert s3_options("endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1") == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "eu-west-1"}
    assert s3_options("access_key=a&secret_key=b&force_virtual_addressing=true") == {
        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true"}
    loc = location(Storage("s3://lake/prefix?region=us-east-1"), "events", env={})
    assert loc == Location("s3://lake/prefix/events", {"AWS_REGION": "us-east-1"})


def test_unsafe_s3_renames_are_refused():
    with pytest.raises(ConfigError, match="overwrite each other's Delta commits"):
        location(Storage("s3://lake/prefix?region=us-east-1"), "events",
                 env={"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})


# --- a flush ---------------------------------------------------------------------------------


def test_a_flush_lands_a_delta_table_that_independent_readers_read_whole(any_redis,
                                                                       storage_dir):
    total = fill(any_redis)
    result = flusher(any_redis, storage_dir).flush("events")
    assert result.status == "ok" and result.rows == total and result.files > 1
    uri = storage_dir / "events"
    assert duckdb_ids(uri) == list(range(total))
    assert polars_ids(uri) == list(range(total))
    dt = DeltaTable(str(uri))
    assert DeltaSink(Storage(str(storage_dir)), 8000).last_committed("events", "events") \
        == result.last_id
    assert dt.transaction_version("deltaflush:events") == txn_version(result.last_id)
    # one commit per range, each saying which range it holds
    flushes = [h for h in dt.history() if h.get("deltaflush.operation") == "flush"]
    assert len(flushes) == result.files and dt.version() == result.files
    assert flushes[0]["deltaflush.last_id"] == result.last_id
    # statistics from the Parquet footers: readers can skip files
    adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    for add in adds:
        ids = ds.dataset(str(uri / add["path"])).to_table()["id"].to_pylist()
        assert (add["num_records"], add["min.id"], add["max.id"]) == \
            (len(ids), min(ids), max(ids))
        assert add["null_count.name"] == 0 and add["min.name"].startswith("x")
    con = duckdb_delta()
    plan = con.execute(f"EXPLAIN ANALYZE SELECT count(*) FROM delta_scan('{uri}') "
                       "WHERE id < 10").fetchall()
    assert "Scanning Files: 1/" in str(plan), plan  # pruned by minValues/maxValues
    assert flusher(any_redis, storage_dir).flush("events").status == "empty"


def test_partition_columns_and_a_time_bucket_are_delta_partitions(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=SETTINGS)
    rows = 40
    for i in range(6):
        batch = id_batch(i * rows, rows).append_column(
            "country", pa.array([["de", "a/b c%", None, "fr"][j % 4] for j in range(rows)]))
        p.append("events", batch)
        if i == 0:
            p.configure("events", partition_by="country", partition_time="ts:day:event_date")
    flusher(any_redis, storage_dir).flush("events")
    uri = str(storage_dir / "events")
    dt = DeltaTable(uri)
    assert dt.metadata().partition_columns == ["country", "event_date"]
    assert pa.schema(dt.schema().to_arrow()).field("event_date").type == pa.date32()
    con = duckdb_delta()
    got = con.execute(f"SELECT country, event_date, count(*) FROM delta_scan('{uri}') "
                      "GROUP BY ALL ORDER BY ALL NULLS LAST").fetchall()
    day = got[0][1]
    assert str(day) == "2023-11-14"
    assert got == [("a/b c%", day, 60), ("de", day, 60), ("fr", day, 60), (None, day, 60)]
    assert duckdb_ids(uri) == list(range(6 * rows))
    # the partition columns are in the log, not in the files
    add = pa.table(dt.get_add_actions(flatten=True)).to_pylist()[0]
    assert "country" not in pq.read_schema(os.path.join(uri, add["path"])).names


def test_added_columns_and_widened_types_evolve_the_delta_table(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=SETTINGS)
    p.append("events", pa.table({"id": pa.array([0, 1], pa.int32()), "v": [1.5, None]}))
    flusher(any_redis, storage_dir).flush("events")
    p.append("events", pa.table({"id": pa.array([2], pa.int64()), "v": [2.5], "tag": ["x"]}))
    flusher(any_redis, storage_dir).flush("events")
    uri = str(storage_dir / "events")
    schema = pa.schema(DeltaTable(uri).schema().to_arrow())
    assert schema.field("id").type == pa.int64() and schema.field("tag").nullable
    rows = duckdb_delta().execute(
        f"SELECT id, v, tag FROM delta_scan('{uri}') ORDER BY id").fetchall()
    assert rows == [(0, 1.5, None), (1, None, None), (2, 2.5, "x")]
    ops = [h.get("deltaflush.operation") for h in DeltaTable(uri).history()]
    assert ops.count("add columns") == 1


def test_a_type_change_delta_cannot_make_marks_the_table_stuck(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=SETTINGS)
    p.append("events", pa.table({"id": pa.array([0], pa.int32())}))
    flusher(any_redis, storage_dir).flush("events")
    p.append("events", pa.table({"id": pa.array([1.5], pa.float64())}))  # int32 -> double
    result = flusher(any_redis, storage_dir).flush("events")
    assert result.status == "stuck" and "cannot change a column's type" in result.error
    assert any_redis.xlen(K.delta) == 1  # nothing trimmed
    assert duckdb_ids(storage_dir / "events") == [0]


def test_the_partition_columns_of_a_delta_table_cannot_change(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=SETTINGS)
    p.append("events", id_batch(0, 10))
    flusher(any_redis, storage_dir).flush("events")
    p.configure("events", partition_by="name")
    p.append("events", id_batch(10, 10))
    result = flusher(any_redis, storage_dir).flush("events")
    assert result.status == "stuck" and "partition columns are" in result.error


# --- exactly once ----------------------------------------------------------------------------


def staged_range(sink: DeltaSink, token: int, first="1-0", last="9-0", ids=range(20)):
    """The range ``first..last`` (rows ``ids``) staged by a flusher with fencing ``token``."""
    data = id_batch(ids.start, len(ids))
    rng = Range("events", "events", first, last, 9, data.schema.serialize().to_pybytes(), "")
    with Encoder() as encoder:
        staging = sink.stage(StageStart("events", first, token, data.schema, TableConfig(),
                                        encoder))
        staging.write(data)
        staging.seal()
        return staging.close(rng)


def test_two_racing_commits_of_the_same_range_land_once(storage_dir):
    """Two flushers (two sinks, as in two processes) both find the range absent, then send
    their commits at the same moment from the same table version: delta-rs's conflict check
    sees the other's app transaction of the same stream, and the loser refreshes and finds
    the range committed."""
    barrier = threading.Barrier(2, timeout=30)
    racing = threading.Event()
    lock = threading.Lock()
    entered: list[int] = []

    class Racing(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            with lock:
                entered.append(1)
                first_two = racing.is_set() and len(entered) <= 2
            if first_two:  # both send their first attempt together; retries go straight on
                barrier.wait()
            return super().create_write_transaction(*args, **kwargs)

    sinks = [DeltaSink(Storage(str(storage_dir)), 8000, open_table=Racing) for _ in range(2)]
    # the table exists before the race, holding an earlier range
    assert not sinks[0].commit(staged_range(sinks[0], 1, "1-0", "1-0", range(20, 25))).already
    entered.clear()
    racing.set()
    staged = [staged_range(s, token, "2-0", "9-0") for token, s in enumerate(sinks, 2)]
    outcomes: list = [None, None]

    def commit(i: int) -> None:
        outcomes[i] = sinks[i].commit(staged[i])

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(o.already for o in outcomes) == [False, True]
    loser = next(o for o in outcomes if o.already)
    assert loser.details["conflicts"] == 1  # refused by delta-rs, then found committed
    dt = DeltaTable(str(storage_dir / "events"))
    assert [h.get("deltaflush.first_id") for h in dt.history()].count("2-0") == 1
    check_delta("two racing commits of the same range", storage_dir / "events", range(25))


def test_a_zombie_frozen_inside_the_lake_commit_commits_nothing_twice(real_redis,
                                                                     storage_dir):
    """A flusher checks that the table lacks its range, and freezes as it sends the commit;
    its lease runs out, another flusher drains the table; the zombie wakes and its commit,
    based on the version it read, meets the successor's app transaction: it refreshes, finds
    the range committed, and its trim is fenced."""
    total = fill(real_redis, batches=4)
    frozen, woken = threading.Event(), threading.Event()

    class Freezing(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            if not frozen.is_set():
                frozen.set()
                assert woken.wait(60)
            return super().create_write_transaction(*args, **kwargs)

    zombie = flusher(real_redis, storage_dir,
                     DeltaSink(Storage(str(storage_dir)), 8000, open_table=Freezing))
    thread = FlushInThread(zombie, "events")
    assert frozen.wait(60)
    real_redis.delete(K.lease)  # the frozen flusher's lease runs out
    assert flusher(real_redis, storage_dir).flush("events").rows == total
    woken.set()
    thread.join(60)
    assert isinstance(thread.error, LeaseLost)
    check_delta("flusher frozen inside the lake commit, woken after a takeover (in process)",
                storage_dir / "events", range(total))
    assert real_redis.xlen(K.delta) == 0


def test_a_commit_that_landed_but_failed_keeps_its_files_and_is_not_repeated(real_redis,
                                                                          storage_dir):
    """The commit reaches the log, then the reply is lost (an I/O error): the flush fails,
    its files stay (they are referenced), and the next flush only trims."""
    total = fill(real_redis, batches=3, rows=20)
    failed = []

    class LostReply(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            super().create_write_transaction(*args, **kwargs)
            if not failed:
                failed.append(1)
                raise OSError("connection reset after the commit was written")

    broken = flusher(real_redis, storage_dir,
                     DeltaSink(Storage(str(storage_dir)), 8000, open_table=LostReply))
    with pytest.raises(OSError, match="connection reset"):
        broken.flush("events")
    real_redis.delete(K.lease)
    assert flusher(real_redis, storage_dir).flush("events").status == "ok"
    check_delta("lake commit landed, its reply lost", storage_dir / "events", range(total))
    assert real_redis.xlen(K.delta) == 0


class PanicException(BaseException):  # noqa: N818 - pyo3's name, which is what is matched
    """Stands in for pyo3's ``PanicException``, what a panic of delta-rs raises (a
    ``BaseException``, not importable; no input is known to make delta-rs 1.6 panic)."""


@pytest.mark.parametrize("landed", [False, True], ids=["before the log entry", "after it"])
def test_a_delta_rs_panic_marks_the_table_stuck_and_loses_nothing(real_redis, storage_dir,
                                                                   landed):
    """A panic inside the commit, before or after its log entry is written, would end a
    Celery worker's process (``BaseException``), and the redelivered task the next one: it
    marks the table stuck instead, trims nothing, and once unstuck the table holds every
    row once."""
    total = fill(real_redis, batches=3, rows=20)

    class Panicking(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            if landed:
                super().create_write_transaction(*args, **kwargs)
            raise PanicException("called `Option::unwrap()` on a `None` value")

    result = flusher(real_redis, storage_dir,
                     DeltaSink(Storage(str(storage_dir)), 8000, open_table=Panicking)
                     ).flush("events")
    assert result.status == "stuck"
    assert "delta-rs panicked while committing range" in result.error
    assert "`deltaflush table unstick`" in result.error
    assert real_redis.xlen(K.delta) == 3  # nothing trimmed
    assert flusher(real_redis, storage_dir).flush("events").status == "stuck"  # held off
    assert "delta-rs panicked" in unstick(real_redis, K)
    assert flusher(real_redis, storage_dir).flush("events").status == "ok"
    check_delta(f"delta-rs panicked {'after' if landed else 'before'} the commit landed",
                storage_dir / "events", range(total))
    assert real_redis.xlen(K.delta) == 0


def test_a_delta_rs_panic_in_maintenance_or_a_read_is_an_ordinary_error(any_redis,
                                                                        storage_dir):
    fill(any_redis, batches=2, rows=10)
    flusher(any_redis, storage_dir).flush("events")

    class Panicking(DeltaTable):
        def get_add_actions(self, *args, **kwargs):
            raise PanicException("index out of bounds")

        def transaction_version(self, *args, **kwargs):
            raise PanicException("index out of bounds")

    sink = DeltaSink(Storage(str(storage_dir)), 8000, open_table=Panicking)
    with pytest.raises(LakePanic, match="while describing a Delta table: index out of bounds"):
        sink.describe("events", TableConfig())
    with pytest.raises(LakePanic, match="reading the Delta table of 'events'"):
        sink.last_committed("events", "events")
    assert deltalake_ids(storage_dir / "events") == list(range(20))


def test_a_commit_that_failed_before_landing_leaves_its_files_to_vacuum(real_redis,
                                                                     storage_dir):
    total = fill(real_redis, batches=3, rows=20)

    class Unreachable(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            raise OSError("timed out before the commit was written")

    storage = Storage(str(storage_dir))
    with pytest.raises(OSError, match="timed out"):
        flusher(real_redis, storage_dir, DeltaSink(storage, 8000, open_table=Unreachable)
                ).flush("events")
    staged = {p for p in (storage_dir / "events").rglob("*.parquet")}
    assert staged  # not deleted: the sink cannot know the commit did not land
    real_redis.delete(K.lease)
    flusher(real_redis, storage_dir).flush("events")
    check_delta("lake commit failed ambiguously, before landing", storage_dir / "events",
                range(total))
    # the orphans go once they are older than the retention (aged here, not waited for)
    old = time.time() - 2 * 3600
    for path in staged:
        os.utime(path, (old, old))
    sink = DeltaSink(storage, 8000)
    config = TableConfig(orphan_retention_s=3600, snapshot_retention_s=3600)
    assert sink.remove_orphans("events", config)["removed"] == len(staged)
    check_delta("orphans of an ambiguous commit vacuumed", storage_dir / "events",
                range(total))


@pytest.mark.parametrize("fault", ["missing", "too old"])
def test_a_staged_file_vacuum_may_have_removed_is_never_committed(real_redis, storage_dir,
                                                                  fault):
    """The orphan guard: a zombie whose staged files were removed (or may be removed at any
    moment) by vacuum commits nothing; the range is staged afresh by the next flush."""
    total = fill(real_redis, batches=3, rows=20)

    def vacuumed(real, staged):
        for f in staged.files:
            if fault == "missing":
                os.remove(f.final)
            else:
                old = time.time() - 2 * 86400  # past half of the default 3 days
                os.utime(f.final, (old, old))
        return real(staged)

    sink = DeltaSink(Storage(str(storage_dir)), 8000)
    with pytest.raises(StagedFileGone):
        flusher(real_redis, storage_dir, Hooked(sink, commit=vacuumed)).flush("events")
    real_redis.delete(K.lease)
    assert flusher(real_redis, storage_dir).flush("events").status == "ok"
    check_delta(f"staged file {fault} at commit (vacuumed under a zombie)",
                storage_dir / "events", range(total))
    adds = pa.table(DeltaTable(str(storage_dir / "events")).get_add_actions()).to_pylist()
    assert all((storage_dir / "events" / a["path"]).exists() for a in adds)


def test_a_range_found_committed_deletes_only_files_never_sent(storage_dir):
    sink = DeltaSink(Storage(str(storage_dir)), 8000)
    first = staged_range(sink, 1)
    assert not sink.commit(first).already
    again = sink.commit(first)  # the same files again: found committed, kept
    assert again.already and all(os.path.exists(f.final) for f in first.files)
    second = staged_range(sink, 2)  # a flusher resuming the range after a crash
    assert sink.commit(second).already
    assert not any(os.path.exists(f.final) for f in second.files)
    sink.discard(first)  # never deletes what a commit was attempted with
    assert all(os.path.exists(f.final) for f in first.files)
    assert deltalake_ids(storage_dir / "events") == list(range(20))


def test_stats_of_a_file_with_nulls_and_timestamps(tmp_path):
    table = pa.table({"id": pa.array([3, None, 1], pa.int64()),
                      "ts": pa.array([1, 2, None], pa.timestamp("us", "UTC")),
                      "f": pa.array([float("nan"), 1.0, 2.0])})
    pq.write_table(table, tmp_path / "f.parquet")
    md = pq.read_metadata(tmp_path / "f.parquet")
    schema, parts = table_schema(table.schema, TableConfig())
    import json

    stats = json.loads(stats_json(md, schema, parts))
    assert stats["numRecords"] == 3
    assert stats["nullCount"] == {"id": 1, "ts": 1, "f": 0}
    assert (stats["minValues"]["id"], stats["maxValues"]["id"]) == (1, 3)
    assert stats["minValues"]["ts"] == "1970-01-01T00:00:00.000001Z"


def test_infinite_floats_beside_other_columns_flush_and_read_back(any_redis, storage_dir):
    """JSON has no infinities: a float column holding one gets no bounds in the file's
    stats (Python's ``Infinity`` made delta-rs fail every commit of the table, as with the
    every-type table of tests/test_read.py), and its values read back exactly."""
    import math

    p = Producer(client=any_redis, settings=SETTINGS)
    data = pa.table({"id": [0, 1, 2], "f": [1.5, float("inf"), -float("inf")],
                     "ok": [True, None, False]})
    p.append("events", data)
    result = flusher(any_redis, storage_dir).flush("events")
    assert result.status == "ok" and result.rows == 3, result
    uri = str(storage_dir / "events")
    rows = duckdb_delta().execute(
        f"SELECT id, f, ok FROM delta_scan('{uri}') ORDER BY id").fetchall()
    assert rows == [(0, 1.5, True), (1, math.inf, None), (2, -math.inf, False)]
    back = DeltaTable(uri).to_pyarrow_table().sort_by("id")
    assert back["f"].to_pylist() == data["f"].to_pylist()
    p.append("events", data)  # the table takes further commits
    assert flusher(any_redis, storage_dir).flush("events").rows == 3
    assert sorted(deltalake_ids(uri)) == [0, 0, 1, 1, 2, 2]


def test_decimals_up_to_38_digits_are_stored_wider_ones_refused(any_redis, storage_dir):
    """Delta's decimals have at most 38 digits: a decimal256 that fits is a decimal128; a
    wider one is refused by name (delta-rs raised a bare error, retried in a loop)."""
    from decimal import Decimal

    p = Producer(client=any_redis, settings=SETTINGS)
    p.configure("events", spark_compatible=False)  # which refuses decimals over 38 digits
    p.append("events", pa.table({"id": [0], "d": pa.array([Decimal("1.25")],
                                                          pa.decimal256(20, 2))}))
    assert flusher(any_redis, storage_dir).flush("events").status == "ok"
    uri = str(storage_dir / "events")
    assert pa.schema(DeltaTable(uri).schema().to_arrow()).field("d").type == \
        pa.decimal128(20, 2)
    assert DeltaTable(uri).to_pyarrow_table()["d"].to_pylist() == [Decimal("1.25")]
    # a wider one: refused at append (tests/test_typepolicy.py); the sink's own check
    # makes the table stuck if a range ever reaches it
    with pytest.raises(NotStorable, match="at most 38 digits"):
        file_schema(pa.schema([("d", pa.decimal256(40, 2))]))


def test_nested_children_are_stored_in_types_delta_holds_or_refused_by_name(any_redis,
                                                                          storage_dir):
    """Inside lists, structs and maps: unsigned integers become wider signed ones (delta-rs
    stored uint8 as byte and failed on 200, in a loop), timestamps microseconds (s failed;
    ns made a table deltalake would not read), decimal256 a decimal; a nested time is
    refused naming the field (at append: tests/test_typepolicy.py), never a bare delta-rs
    error."""
    import datetime as dt
    from decimal import Decimal

    p = Producer(client=any_redis, settings=SETTINGS)
    p.configure("events", spark_compatible=False)
    data = pa.table({
        "id": [0],
        "u8s": pa.array([[1, 200]], pa.list_(pa.uint8())),
        "m": pa.array([[("a", 60000)]], pa.map_(pa.string(), pa.uint16())),
        "tsns": pa.array([[1_000_001_000]], pa.list_(pa.timestamp("ns"))),
        "s": pa.array([{"at": 1, "d": Decimal("1.25")}],
                      pa.struct([("at", pa.timestamp("s")), ("d", pa.decimal256(20, 2))])),
    })
    p.append("events", data)
    result = flusher(any_redis, storage_dir).flush("events")
    assert result.status == "ok", result.error
    uri = str(storage_dir / "events")
    schema = pa.schema(DeltaTable(uri).schema().to_arrow())
    assert schema.field("u8s").type.value_type == pa.int16()
    back = DeltaTable(uri).to_pyarrow_table()
    assert back["u8s"].to_pylist() == [[1, 200]] and back["m"].to_pylist() == [[("a", 60000)]]
    assert back["tsns"].to_pylist() == [[dt.datetime(1970, 1, 1, 0, 0, 1, 1)]]
    assert back["s"].to_pylist() == [{"at": dt.datetime(1970, 1, 1, 0, 0, 1),
                                      "d": Decimal("1.25")}]
    rows = duckdb_delta().execute(f"SELECT u8s, s.d FROM delta_scan('{uri}')").fetchall()
    assert rows == [([1, 200], Decimal("1.25"))]
    with pytest.raises(NotStorable, match=r"column 'c.x' has type time32\[s\]"):
        file_schema(pa.schema([("c", pa.struct([("x", pa.time32("s"))]))]))
