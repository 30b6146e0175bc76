"""Maintenance of lake tables: compaction (alone and alongside flushes), snapshot expiry,
orphan removal that spares unfinished flushes, the scheduling round, the lock, and what
status, ``table show``, ``compact`` and the metrics show."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from producer import Producer, Settings, wire
from producer.errors import LeaseLost
from tests.conftest import free_port, id_batch
from tests.lake import duckdb_ids
from tests.reliability import check_lake
from tests.seams import FlushInThread, Hooked
from tests.test_metrics import scrape
from workers import maintenance
from workers.cli import main
from workers.flusher import Flusher
from workers.metrics import serve
from workers.sinks.iceberg import IcebergSink
from workers.storage import Storage

SETTINGS = Settings(max_file_bytes=8_000, table_format="iceberg")
TABLE = "events"


def small_table(client, root, flushes=10, rows=50) -> tuple[Producer, Flusher, int]:
    """A table of ``flushes`` small files, one flush each."""
    p = Producer(client=client, settings=SETTINGS)
    f = Flusher(client, Storage(str(root)), SETTINGS)
    for i in range(flushes):
        p.append(TABLE, id_batch(i * rows, rows))
        f.flush(TABLE)
    return p, f, flushes * rows


def lake(client) -> dict:
    return maintenance.lake_info(client.hgetall(wire.Keys("deltaflush", TABLE).lake)) or {}


def test_compaction_packs_small_files_and_keeps_every_row(real_redis, storage_dir):
    p, f, total = small_table(real_redis, storage_dir)
    assert lake(real_redis)["files"] == 10  # counted by each commit
    assert lake(real_redis)["format"] == "iceberg" and lake(real_redis)["snapshot"]
    p.configure(TABLE, target_file_bytes=1 << 20)
    done = maintenance.maintain(real_redis, f, TABLE, compact=True)
    assert done["compaction"]["compacted"] == 10 and done["compaction"]["written"] == 1
    info = lake(real_redis)
    assert info["files"] == 1 and info["small_files"] == 1
    assert info["snapshot"] == done["compaction"]["snapshot"]
    check_lake("compaction of 10 small files", storage_dir, TABLE, range(total))
    stats = real_redis.hgetall(wire.Keys("deltaflush", TABLE).stats)
    assert int(stats[b"lake_compactions"]) == 1 and int(stats[b"lake_files_compacted"]) == 10
    assert int(stats[b"lake_commits"]) == 10
    # the compaction is a snapshot of its own; the watermark survives it
    sink = IcebergSink(Storage(str(storage_dir)), SETTINGS)
    assert sink.last_committed(TABLE, TABLE) == real_redis.hget(
        wire.Keys("deltaflush", TABLE).stats, "last_id").decode()


def test_policy_expires_snapshots_and_removes_orphans_but_not_live_files(real_redis,
                                                                         storage_dir):
    p, f, total = small_table(real_redis, storage_dir)
    p.configure(TABLE, target_file_bytes=1 << 20, compact_min_small_files=5,
                snapshot_retention_s=0.001, orphan_retention_s=0.001)
    done = maintenance.maintain(real_redis, f, TABLE)
    assert done["compaction"]["compacted"] == 10
    assert done["expiry"]["expired"] >= 10
    assert done["orphans"]["removed"] >= 10  # the compacted files, unreferenced now
    table = IcebergSink(Storage(str(storage_dir)), SETTINGS).load(TABLE)
    assert len(table.snapshots()) == 1
    check_lake("compaction, expiry and orphan removal", storage_dir, TABLE, range(total))
    data = list((storage_dir / TABLE / "data").rglob("*.parquet"))
    assert len(data) == 1  # only the live file is left


def test_orphan_removal_spares_the_files_of_an_unfinished_flush(real_redis, storage_dir):
    p, f, _ = small_table(real_redis, storage_dir, flushes=2)
    p.configure(TABLE, orphan_retention_s=3600, snapshot_retention_s=0.001)
    p.append(TABLE, id_batch(100, 50))
    staged_paths: list[str] = []
    sink = IcebergSink(Storage(str(storage_dir)), SETTINGS)

    def maintain_before_commit(real, staged):
        staged_paths.extend(x.temp for x in staged.files)
        maintenance.maintain(real_redis, f, TABLE)  # runs while this flush waits to commit
        return real(staged)

    Flusher(real_redis, Storage(str(storage_dir)), SETTINGS,
            sink=Hooked(sink, commit=maintain_before_commit)).flush(TABLE)
    assert staged_paths
    check_lake("orphan removal while a flush holds staged files", storage_dir, TABLE,
               range(150))


def flush_while_compacting(client, p: Producer, f: Flusher, rounds: int,
                           ids: Callable[[], list[int]]) -> list[int]:
    """``rounds`` batches of 40 rows appended with ``p`` and flushed by ``f``, while a thread
    runs compactions of TABLE all along; every fifth round, no row twice in ``ids()`` (the
    table's current snapshot). Returns how many files each compaction rewrote."""
    stop = threading.Event()
    compactions = []

    def compact_all_along():
        while not stop.is_set():
            done = maintenance.maintain(client, f, TABLE, compact=True)
            compactions.append(done.get("compaction", {}).get("compacted", 0))

    thread = threading.Thread(target=compact_all_along)
    thread.start()
    try:
        for i in range(rounds):
            p.append(TABLE, id_batch(i * 40, 40))
            f.flush(TABLE)
            if i % 5 == 4:
                found = ids()  # no snapshot holds a row twice
                assert len(found) == len(set(found))
    finally:
        stop.set()
        thread.join(60)
    return compactions


def test_compaction_alongside_flushes_loses_and_duplicates_nothing(real_redis, storage_dir):
    """Flushes commit while compactions rewrite: each side's conflicting commit looks at
    the table again; readers see every row once at every snapshot."""
    p = Producer(client=real_redis, settings=SETTINGS)
    p.configure(TABLE, target_file_bytes=1 << 20)
    f = Flusher(real_redis, Storage(str(storage_dir)), SETTINGS)
    total = 30 * 40
    compactions = flush_while_compacting(real_redis, p, f, 30,
                                         lambda: duckdb_ids(storage_dir, TABLE))
    assert sum(compactions) > 0
    stats = real_redis.hgetall(wire.Keys("deltaflush", TABLE).stats)
    print("conflicts met by flushes:", stats.get(b"lake_conflicts"), "compactions:",
          len(compactions))
    check_lake("compaction running alongside flushes (threads)", storage_dir, TABLE,
               range(total))


def test_a_maintenance_run_holds_a_lock_flushes_do_not_take(real_redis, storage_dir):
    p, f, _ = small_table(real_redis, storage_dir, flushes=2)
    keys = wire.Keys("deltaflush", TABLE)
    real_redis.set(keys.maint_lock, "99")
    assert maintenance.maintain(real_redis, f, TABLE)["status"] == "busy"
    p.append(TABLE, id_batch(100, 10))
    assert f.flush(TABLE).status == "ok"  # flushes go on
    assert maintenance.due_tables(real_redis, "deltaflush", 0) == []  # a run holds it
    real_redis.delete(keys.maint_lock)
    assert maintenance.due_tables(real_redis, "deltaflush", 0) == [TABLE]
    assert maintenance.due_tables(real_redis, "deltaflush", 0) == []  # scheduled already
    p.configure(TABLE, maintenance_interval_s=0.001)
    assert maintenance.due_tables(real_redis, "deltaflush", 3_600_000) == [TABLE]


def test_only_lake_tables_are_due_and_compact_refuses_parquet(real_redis, storage_dir,
                                                              redis_server):
    p = Producer(client=real_redis, settings=Settings())
    p.append("plain", id_batch(0, 10))
    Flusher(real_redis, Storage(str(storage_dir)), Settings()).flush("plain")
    assert maintenance.due_tables(real_redis, "deltaflush", 0) == []
    env = {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}
    out = CliRunner().invoke(main, ["compact", "plain"], env=env)
    assert out.exit_code == 2 and "is a parquet table" in out.output


def test_cli_compact_table_show_status_and_metrics(real_redis, storage_dir, redis_server):
    p, f, total = small_table(real_redis, storage_dir, flushes=6)
    env = {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir),
           "DELTAFLUSH_MAX_FILE_BYTES": "8000"}
    out = CliRunner().invoke(main, ["table", "set", TABLE, "--target-file-bytes", "1048576"],
                             env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(CliRunner().invoke(main, ["table", "show", TABLE, "--json"],
                                          env=env).output)
    assert shown["config"]["format"] == "iceberg" and shown["lake"]["files"] == 6
    text = CliRunner().invoke(main, ["table", "show", TABLE], env=env).output
    assert "lake table: iceberg @" in text and "6 files, 6 small" in text
    out = CliRunner().invoke(main, ["compact", TABLE], env=env)
    assert out.exit_code == 0, out.output
    assert "6 files rewritten into 1; now 1 files (1 small)" in out.output
    status = json.loads(CliRunner().invoke(main, ["status", "--json"], env=env).output)
    assert status[0]["lake"]["format"] == "iceberg" and status[0]["lake"]["files"] == 1
    assert status[0]["lake"]["snapshot"]
    text = CliRunner().invoke(main, ["status"], env=env).output
    assert "iceberg @" in text and "1 files, 1 small" in text
    port = free_port()
    server = serve(real_redis, "deltaflush", port, "127.0.0.1")
    try:
        m = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
    assert m[("deltaflush_lake_files", TABLE, None)] == 1
    assert m[("deltaflush_lake_commits_total", TABLE, None)] == 6
    assert m[("deltaflush_lake_compactions_total", TABLE, None)] == 1
    assert m[("deltaflush_lake_files_compacted_total", TABLE, None)] == 6
    assert ("deltaflush_lake_commit_conflicts_total", TABLE, None) in m
    check_lake("deltaflush compact", storage_dir, TABLE, range(total))


def test_a_zombie_after_compaction_commits_nothing_twice(real_redis, storage_dir):
    """The folder format's hazard: a zombie republishing after a compaction. Here the
    zombie's commit finds its range held (the watermark survives compaction)."""
    p = Producer(client=real_redis, settings=SETTINGS)
    for i in range(12):
        p.append(TABLE, id_batch(i * 50, 50))
    frozen, woken = threading.Event(), threading.Event()

    def freeze(real, staged):
        frozen.set()
        assert woken.wait(60)
        return real(staged)

    sink = IcebergSink(Storage(str(storage_dir)), SETTINGS)
    zombie = Flusher(real_redis, Storage(str(storage_dir)), SETTINGS,
                     sink=Hooked(sink, commit=freeze))
    thread = FlushInThread(zombie, TABLE)
    assert frozen.wait(60)
    real_redis.delete(wire.Keys("deltaflush", TABLE).lease)
    f = Flusher(real_redis, Storage(str(storage_dir)), SETTINGS)
    assert f.flush(TABLE).rows == 600
    p.configure(TABLE, target_file_bytes=1 << 20)
    done = maintenance.maintain(real_redis, f, TABLE, compact=True)
    assert done["compaction"]["compacted"], done
    woken.set()
    thread.join(60)
    assert isinstance(thread.error, LeaseLost)
    check_lake("zombie woken after a takeover and a compaction", storage_dir, TABLE,
               range(600))


@pytest.mark.parametrize("fmt", ["parquet"])
def test_maintainable_tells_lake_sinks(fmt, storage_dir):
    from workers.sinks import for_format

    assert maintenance.maintainable(for_format(fmt, Storage(str(storage_dir)), Settings())) \
        is None
    assert maintenance.maintainable(IcebergSink(Storage(str(storage_dir)), SETTINGS))
