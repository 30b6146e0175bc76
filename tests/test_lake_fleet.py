"""Iceberg tables under real fleets: ``celery -A workers.app worker`` and ``beat`` processes,
a real redis-server, a SQLite catalog shared by the processes, and faults at every step of a
lake commit. Each test reads the table back with DuckDB's ``iceberg_scan`` and checks every
id is there exactly once."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from producer import wire
from tests.conftest import id_batch, wait_for
from tests.lake import duckdb_ids
from tests.reliability import SCALE, check_lake
from tests.test_fleet import TABLE, drained, fill, freeze_and_take_over, run_demo, wait_drained

pytestmark = pytest.mark.integration

K = wire.Keys("deltaflush", TABLE)


@pytest.fixture
def lake_env(fleet_env):
    fleet_env["DELTAFLUSH_TABLE_FORMAT"] = "iceberg"
    return fleet_env


@pytest.mark.parametrize("step", ["flush.claimed", "lake.commit", "lake.committed",
                                  "flush.committed"])
def test_sigkill_around_the_lake_commit_and_the_trim(step, lake_env, fleet, producer_for,
                                                     real_redis, storage_dir):
    """``lake.commit``: before the catalog commit; ``lake.committed``: after it, before the
    trim; ``flush.committed``: after the trim."""
    p = producer_for()
    total = fill(p)
    fleet.worker(failpoints=f"{step}=kill")
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    check_lake(f"worker process SIGKILLed at {step}", storage_dir, TABLE, range(total))
    assert (Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / step).exists()
    if step == "lake.committed":  # the retry found its range held and only trimmed
        assert int(real_redis.hget(K.stats, "lake_already") or 0) >= 1


def test_a_worker_frozen_mid_commit_past_its_lease_commits_nothing_twice(
        lake_env, fleet, producer_for, real_redis, storage_dir):
    """Frozen (SIGSTOP) between its check of the table and its catalog commit; another
    worker takes the table over and drains it; woken (SIGCONT), the commit fails on the
    moved branch, finds its range held and its trim is fenced."""
    p = producer_for()
    total = fill(p)
    frozen_pid, frozen_log = freeze_and_take_over(fleet, real_redis, total, "lake.commit")
    os.kill(frozen_pid, signal.SIGCONT)
    wait_for(lambda: b"fenced" in frozen_log.read_bytes(), 60, "the woken flusher to be fenced")
    check_lake("worker frozen mid-commit past its lease, woken after takeover", storage_dir,
               TABLE, range(total))
    assert drained(real_redis, total)


def test_a_catalog_error_is_retried_as_transient(lake_env, fleet, producer_for, real_redis,
                                                 storage_dir):
    p = producer_for()
    total = fill(p, batches=10)
    _, log = fleet.worker(failpoints="lake.commit=raise")
    p.flush(TABLE)
    wait_drained(fleet, real_redis, total)
    check_lake("catalog commit error, retried with backoff", storage_dir, TABLE, range(total))
    text = log.read_text()
    assert "injected fault at lake.commit" in text and "retry 1 in 1s" in text


@pytest.mark.parametrize("fault", ["", "lake.compacted=kill"])
def test_beat_compacts_by_itself_while_flushes_go_on(fault, lake_env, fleet, producer_for,
                                                     real_redis, storage_dir):
    """Beat schedules maintenance from the table's policy; compactions run while a
    producer appends and flushes commit (``lake.compacted=kill``: a worker dies with a
    compaction written and not committed)."""
    p = producer_for()
    p.append(TABLE, id_batch(0, 50))
    p.configure(TABLE, maintenance_interval_s=0.5, compact_min_small_files=3,
                target_file_bytes=1 << 20, flush_interval_s=0.2)
    batches = 120 * SCALE
    fleet.worker(concurrency=2, failpoints=fault)
    fleet.beat()

    def produce():
        for i in range(1, batches):
            p.append(TABLE, id_batch(i * 50, 50))
            if i % 20 == 0:  # let some flushes commit in between
                wait_for(lambda: not real_redis.xlen(K.delta), 60, "a flush")

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join()
    total = batches * 50
    wait_drained(fleet, real_redis, total)
    wait_for(lambda: int(real_redis.hget(K.stats, "lake_compactions") or 0) >= 1, 90,
             "beat to compact the table")
    if fault:
        fleet.restart_dead_workers()
    ids = duckdb_ids(storage_dir, TABLE)
    assert len(ids) == len(set(ids))
    name = "compaction by beat alongside flushes" + (
        ", a worker SIGKILLed with a compaction written" if fault else "")
    check_lake(name, storage_dir, TABLE, range(total))


def test_the_demo_runs_with_iceberg_tables(tmp_path):
    """`deltaflush demo --format iceberg` with nothing but the package."""
    out, run = run_demo(tmp_path, "iceberg")
    assert "in Iceberg" in out and out.count(": ok") == 1
    assert (run / "_deltaflush" / "catalog.db").exists()
    assert duckdb_ids(run, "demo_events_0")
