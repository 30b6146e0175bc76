"""Delta tables flushed by real fleets (``celery -A workers.app worker``/``beat``), with
faults injected around the lake commit: SIGKILL before and after it and before and after the
trim, a worker frozen past its lease inside the commit and woken after a takeover, and
compaction, log expiry and vacuum running alongside. Each test reads the table back with
DuckDB's delta extension and checks every id is there exactly once."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from producer.tablecfg import TableConfig
from tests.conftest import wait_for
from tests.delta_readers import deltalake_ids
from tests.reliability import check_delta
from tests.test_delta_maintenance import loadable
from tests.test_fleet import TABLE, drained, fill, freeze_and_take_over, run_demo, wait_drained
from workers.sinks.delta import DeltaSink
from workers.storage import Storage

pytestmark = pytest.mark.integration

#: Where each failpoint is, around the lake commit of a range.
STEPS = {
    "flush.claimed": "before the lake commit (claim recorded)",
    "lake.commit": "in the lake commit, checked and about to send it",
    "lake.committed": "after the lake commit, before the trim",
    "flush.committed": "after the trim",
}


@pytest.fixture
def delta_env(fleet_env):
    fleet_env["DELTAFLUSH_TABLE_FORMAT"] = "delta"
    return fleet_env


@pytest.mark.parametrize("step", list(STEPS))
def test_sigkill_around_the_lake_commit_loses_and_duplicates_nothing(
        step, delta_env, fleet, producer_for, real_redis, storage_dir):
    p = producer_for()
    total = fill(p)
    fleet.worker(failpoints=f"{step}=kill")
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    check_delta(f"worker SIGKILLed {STEPS[step]}", storage_dir / TABLE, range(total))
    assert (Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / step).exists()
    assert fleet.logged("SIGKILL"), fleet.logs()


@pytest.mark.parametrize("step", ["lake.commit", "lake.committed"])
def test_a_worker_frozen_in_the_lake_commit_past_its_lease_is_fenced(
        step, delta_env, fleet, producer_for, real_redis, storage_dir):
    """Frozen (SIGSTOP) with the commit checked and about to be sent, or sent and not yet
    trimmed; another worker takes the table over and drains it; the frozen one is woken
    (SIGCONT): its commit meets the successor's app transaction and commits nothing, and
    its trim is fenced."""
    p = producer_for()
    total = fill(p)
    frozen_pid, frozen_log = freeze_and_take_over(fleet, real_redis, total, step)
    os.kill(frozen_pid, signal.SIGCONT)
    wait_for(lambda: b"fenced" in frozen_log.read_bytes(), 30, "the woken flusher to be fenced")
    if step == "lake.commit":  # its commit was refused by delta-rs, then found committed
        assert b"conflicted (Failed to commit transaction: Concurrent transaction failed" \
            in frozen_log.read_bytes()
        assert b"already holds range" in frozen_log.read_bytes()
    check_delta(f"worker frozen past its lease {STEPS[step]}, woken after a takeover",
                storage_dir / TABLE, range(total))
    assert drained(real_redis, total)


def test_maintenance_alongside_a_fleet_with_a_crash(delta_env, fleet, producer_for,
                                                    real_redis, storage_dir):
    """A producer appends while a worker flushes, its process SIGKILLed once after a lake
    commit (and restarted by the worker); meanwhile compaction, log expiry and vacuum run
    in a loop (as the maintenance task would), and every version read meanwhile holds each
    row at most once."""
    p = producer_for()
    uri = str(storage_dir / TABLE)
    fleet.worker(failpoints="lake.committed=kill")  # its pool process restarts once killed
    fleet.beat()
    batches, rows = 80, 100
    done = threading.Event()

    def produce() -> None:
        for i in range(batches):
            p.append(TABLE, [{"id": i * rows + j, "v": float(j)} for j in range(rows)])
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    sink = DeltaSink(Storage(str(storage_dir)), 65536)
    config = TableConfig(target_file_bytes=1 << 20, snapshot_retention_s=3600,
                         orphan_retention_s=3600)
    compacted = []

    def maintenance_round() -> bool:
        """One round of maintenance and a read; True once everything is flushed."""
        compacted.append(sink.compact(TABLE, config)["compacted"])
        sink.expire_snapshots(TABLE, config)
        sink.remove_orphans(TABLE, config)
        ids = deltalake_ids(uri)
        assert len(ids) == len(set(ids)), "a reader saw a row twice"
        return done.is_set() and drained(real_redis, batches * rows) and sum(compacted) > 0

    try:
        wait_for(lambda: loadable(uri), 60, "the table's first version")
        wait_for(maintenance_round, 240, "the fleet to drain the table", interval=0.2)
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        thread.join(60)
    check_delta("compaction, log expiry and vacuum alongside a fleet with a SIGKILL "
                "after a lake commit", uri, range(batches * rows))
    assert (Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / "lake.committed").exists()


def test_the_demo_runs_with_delta_tables(tmp_path):
    """`deltaflush demo --format delta`: every row of the run read back from the Delta
    table by an independent reader."""
    from tests.delta_readers import duckdb_ids

    out, run = run_demo(tmp_path, "delta")
    assert "in Delta" in out and out.count(": ok") == 1
    assert (run / "demo_events_0" / "_delta_log").is_dir()
    assert duckdb_ids(run / "demo_events_0")
