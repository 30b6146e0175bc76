"""Maintenance of Delta tables (the ``Maintainable`` protocol): compaction in one commit
while flushes go on, log expiry that keeps the app transactions, vacuum that keeps what a
live version or an unfinished flush needs. The maintenance methods are called directly."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from deltalake.table import TableOptimizer

from producer import Producer, Settings, wire
from producer.tablecfg import TableConfig
from tests.conftest import id_batch, wait_for
from tests.delta_readers import deltalake_ids
from tests.reliability import check_delta
from tests.test_delta import staged_range
from workers.flusher import Flusher
from workers.sinks.delta import DeltaSink
from workers.storage import Storage

SETTINGS = Settings(max_file_bytes=4_000, table_format="delta")
K = wire.Keys("deltaflush", "events")
APP = "deltaflush:events"


def flush_ranges(client, root, first: int, batches: int, rows: int = 30) -> None:
    """Append ``batches`` batches (ids from ``first``) and flush them, a few per file."""
    p = Producer(client=client, settings=SETTINGS)
    for i in range(batches):
        p.append("events", id_batch(first + i * rows, rows))
    Flusher(client, Storage(str(root)), SETTINGS).flush("events")


def loadable(uri: str) -> bool:
    """The table has a first version (its folder appears earlier: files are staged in it)."""
    try:
        DeltaTable(uri)
    except Exception:  # noqa: BLE001 - TableNotFoundError, or a log being created
        return False
    return True


def sink(root, **kw) -> DeltaSink:
    return DeltaSink(Storage(str(root)), SETTINGS.max_file_bytes, **kw)


def test_describe_tells_the_version_files_and_small_files(any_redis, storage_dir):
    config = TableConfig(target_file_bytes=1 << 20)
    assert sink(storage_dir).describe("events", config).snapshot is None
    flush_ranges(any_redis, storage_dir, 0, 20)
    info = sink(storage_dir).describe("events", config)
    dt = DeltaTable(str(storage_dir / "events"))
    assert info.format == "delta" and info.snapshot == str(dt.version())
    assert info.files == len(dt.file_uris()) > 1 and info.small_files == info.files
    assert info.rows == 600 and info.bytes > 0
    assert sink(storage_dir).describe("events", TableConfig(target_file_bytes=1024)
                                      ).small_files == 0


def test_compaction_bin_packs_small_files_in_one_commit(any_redis, storage_dir):
    flush_ranges(any_redis, storage_dir, 0, 40)
    uri = storage_dir / "events"
    before = DeltaTable(str(uri))
    config = TableConfig(target_file_bytes=1 << 20)
    small = sink(storage_dir).describe("events", config).small_files
    result = sink(storage_dir).compact("events", config)
    after = DeltaTable(str(uri))
    assert after.version() == before.version() + 1  # one atomic commit
    assert result["compacted"] > 1 and result["written"] >= 1
    assert sink(storage_dir).describe("events", config).small_files < small
    assert after.history(1)[0]["operation"] == "OPTIMIZE"
    assert after.transaction_version(APP) == before.transaction_version(APP)
    check_delta("compaction of a quiet table", uri, range(1200))
    # a flush after it lands once, on top of the compacted table
    flush_ranges(any_redis, storage_dir, 1200, 5)
    check_delta("flush after compaction", uri, range(1350))


def test_a_flush_based_on_a_version_before_a_compaction_is_rebased_over_it(real_redis,
                                                                          storage_dir):
    """The flush's commit is sent from the version it read; a compaction commits first,
    removing files: delta-rs finds no conflict, the flush lands on top, once."""
    flush_ranges(real_redis, storage_dir, 0, 20)
    config = TableConfig(target_file_bytes=1 << 20)
    compactions = []

    class CompactedMeanwhile(DeltaTable):
        def create_write_transaction(self, *args, **kwargs):
            if not compactions:
                compactions.append(sink(storage_dir).compact("events", config))
            return super().create_write_transaction(*args, **kwargs)

    p = Producer(client=real_redis, settings=SETTINGS)
    for i in range(3):
        p.append("events", id_batch(600 + i * 30, 30))
    flusher = Flusher(real_redis, Storage(str(storage_dir)), SETTINGS,
                      sink=sink(storage_dir, open_table=CompactedMeanwhile))
    assert flusher.flush("events").status == "ok"
    assert compactions and compactions[0]["compacted"] > 1
    check_delta("flush committed over a compaction it did not see", storage_dir / "events",
                range(690))


def test_a_compaction_that_conflicts_is_planned_again(real_redis, storage_dir):
    """A schema change lands between the compaction's read and its commit: delta-rs refuses
    the compaction (metadata changed), which is planned again from the latest version."""
    flush_ranges(real_redis, storage_dir, 0, 20)
    changed = []

    class SchemaChangedMeanwhile(DeltaTable):
        @property
        def optimize(self) -> TableOptimizer:
            if not changed:
                changed.append(1)
                p = Producer(client=real_redis, settings=SETTINGS)
                p.append("events", id_batch(600, 5).append_column("extra", pa.array([1] * 5)))
                Flusher(real_redis, Storage(str(storage_dir)), SETTINGS).flush("events")
            return TableOptimizer(self)

    result = sink(storage_dir, open_table=SchemaChangedMeanwhile).compact(
        "events", TableConfig(target_file_bytes=1 << 20))
    assert result["attempts"] == 2 and result["compacted"] > 1
    check_delta("compaction refused by a schema change, planned again",
                storage_dir / "events", range(605))


def test_compaction_alongside_flushes_never_shows_a_row_twice_or_loses_one(real_redis,
                                                                         storage_dir):
    """A producer appends and a flusher drains while compaction, log expiry and vacuum run
    in a loop; every version a reader opens meanwhile holds each committed row once."""
    uri = str(storage_dir / "events")
    batches, rows = 120, 25
    done = threading.Event()
    errors: list[BaseException] = []

    def produce_and_flush() -> None:
        try:
            p = Producer(client=real_redis, settings=SETTINGS)
            flusher = Flusher(real_redis, Storage(str(storage_dir)), SETTINGS)
            for i in range(batches):
                p.append("events", id_batch(i * rows, rows))
                if i % 10 == 9:
                    flusher.flush("events")
            flusher.flush("events")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=produce_and_flush)
    worker.start()
    maintenance = sink(storage_dir)
    config = TableConfig(target_file_bytes=1 << 20, snapshot_retention_s=3600,
                         orphan_retention_s=3600)
    wait_for(lambda: loadable(uri) or done.is_set(), 60, "the first flush")
    compacted, seen = 0, 0
    while not done.is_set() or compacted == 0:
        compacted += maintenance.compact("events", config)["compacted"]
        maintenance.expire_snapshots("events", config)
        maintenance.remove_orphans("events", config)
        ids = deltalake_ids(uri)
        assert len(ids) == len(set(ids)), "a reader saw a row twice"
        assert len(ids) >= seen, "a reader missed rows it saw before"
        seen = len(ids)
    worker.join(60)
    assert not errors, errors
    assert compacted > 0
    check_delta("compaction, log expiry and vacuum looping alongside flushes (in process)",
                uri, range(batches * rows))
    assert real_redis.xlen(K.delta) == 0


def test_log_expiry_keeps_the_app_transactions(any_redis, storage_dir):
    flush_ranges(any_redis, storage_dir, 0, 30)
    uri = str(storage_dir / "events")
    held = DeltaTable(uri).transaction_version(APP)
    config = TableConfig(snapshot_retention_s=1)
    maintenance = sink(storage_dir)
    # log entries become expirable once older than the retention: poll until they go
    wait_for(lambda: maintenance.expire_snapshots("events", config)["expired"], 30,
             "old log entries to be cleaned up", interval=0.3)
    dt = DeltaTable(uri)
    assert dt.transaction_version(APP) == held
    assert dt.metadata().configuration["delta.logRetentionDuration"] == "interval 1 seconds"
    with pytest.raises(Exception, match="(?i)no files in log segment|not found"):
        DeltaTable(uri, version=1)  # expired
    check_delta("log expiry", uri, range(900))
    # and the range record still refuses a replay
    assert sink(storage_dir).last_committed("events", "events") is not None


def test_vacuum_keeps_what_a_live_version_or_an_unfinished_flush_needs(any_redis,
                                                                     storage_dir):
    flush_ranges(any_redis, storage_dir, 0, 20)
    uri = storage_dir / "events"
    before = DeltaTable(str(uri)).version()
    maintenance = sink(storage_dir)
    config = TableConfig(target_file_bytes=1 << 20, orphan_retention_s=3600,
                         snapshot_retention_s=60)
    assert maintenance.compact("events", config)["compacted"] > 1
    # a flush that staged its files and has not committed yet
    unfinished = staged_range(maintenance, 99, "3000000000000-0", "3000000000000-0",
                              range(600, 620))
    # a crashed flush's file, older than the retention
    orphan = uri / "part-crashed.parquet"
    pq.write_table(id_batch(5000, 3), orphan)
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    result = maintenance.remove_orphans("events", config)
    assert result["removed"] == 1 and not orphan.exists()
    # the version before the compaction is still readable whole...
    assert sorted(DeltaTable(str(uri), version=before).to_pyarrow_table()["id"].to_pylist()
                  ) == list(range(600))
    # ...and the unfinished flush commits its files
    assert not maintenance.commit(unfinished).already
    check_delta("vacuum beside an unfinished flush", uri, range(620))


def test_cli_compact_reports_what_a_delta_compaction_did(real_redis, storage_dir, redis_server):
    """``deltaflush compact`` reads the one shape of ``Maintainable.compact`` whatever the
    format: a Delta table's compaction says how many files it rewrote, and is counted."""
    from click.testing import CliRunner

    from workers.cli import main

    flush_ranges(real_redis, storage_dir, 0, 20)
    before = len(DeltaTable(str(storage_dir / "events")).file_uris())
    assert before > 1
    env = {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir),
           "DELTAFLUSH_MAX_FILE_BYTES": "4000", "DELTAFLUSH_TABLE_FORMAT": "delta"}
    out = CliRunner().invoke(main, ["table", "set", "events", "--target-file-bytes", "1048576"],
                             env=env)
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["compact", "events"], env=env)
    assert out.exit_code == 0, out.output
    assert f"events: {before} files rewritten into 1; now 1 files" in out.output
    stats = real_redis.hgetall(K.stats)
    assert int(stats[b"lake_compactions"]) == 1
    assert int(stats[b"lake_files_compacted"]) == before
    check_delta("deltaflush compact of a delta table", storage_dir / "events", range(600))
