"""Real fleets: ``celery -A workers.app worker`` and ``beat`` in subprocesses, a real
redis-server, and faults injected at every step of the flush protocol. Each test reads every
Parquet file back and checks every id is there exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from producer import Settings, wire
from tests.conftest import ROOT, Fleet, assert_exactly_once, id_batch, wait_for
from tests.reliability import SCALE, check
from workers.app import make_app

pytestmark = pytest.mark.integration

TABLE = "events"
K = wire.Keys("deltaflush", TABLE)
STEPS = ["flush.leased", "flush.first_chunk", "flush.written", "flush.claimed",
         "flush.published", "flush.committed"]


def fill(producer, table=TABLE, batches=60, rows=100) -> int:
    batches *= SCALE
    producer.append_many(table, [id_batch(i * rows, rows) for i in range(batches)])
    return batches * rows


def drained(client, total, table=TABLE):
    k = wire.Keys("deltaflush", table)
    return (client.xlen(k.delta) == 0 and not client.exists(k.claim)
            and not client.exists(k.lease) and int(client.hget(k.stats, "rows") or 0) >= total)


def wait_drained(fleet: Fleet, client, total, table=TABLE, timeout=60):
    try:
        wait_for(lambda: drained(client, total, table), timeout, f"{table} to drain")
    except BaseException:
        print(fleet.logs())
        raise


def freeze_and_take_over(fleet: Fleet, client, total: int, step: str) -> tuple[int, Path]:
    """A worker frozen (SIGSTOP) at failpoint ``step`` of a flush of TABLE, its lease
    running out; beat, and a second worker that takes the table over and drains it. Returns
    the frozen process's pid, to wake it, and the frozen worker's log."""
    _, frozen_log = fleet.worker(failpoints=f"{step}=stop")
    marker = Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / step
    fleet.beat()
    wait_for(marker.exists, 60, f"a flusher to freeze at {step}")
    frozen_pid = int(str(wait_for(marker.read_text, 10, "the frozen pid")))
    fleet.worker()  # takes the table over once the frozen lease expires
    wait_drained(fleet, client, total)
    return frozen_pid, frozen_log


def run_demo(tmp_path: Path, fmt: str) -> tuple[str, Path]:
    """``deltaflush demo --format fmt`` for 2 s on 1 table in ``tmp_path``, with none of this
    environment's DELTAFLUSH_ settings (nothing but the package); returns its output and the
    run's folder (one of its own under ./data)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAFLUSH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deltaflush")), "demo", "--seconds", "2",
         "--tables", "1", "--format", fmt],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = (tmp_path / "data").iterdir()
    return proc.stdout, run


def test_worker_and_beat_flush_every_table(fleet, producer_for, real_redis, storage_dir):
    p = producer_for()
    totals = {f"t{i}": fill(p, f"t{i}") for i in range(3)}
    fleet.worker(concurrency=2)
    fleet.beat()
    for table, total in totals.items():
        wait_drained(fleet, real_redis, total, table)
        check("none (baseline: 3 tables, worker + beat)", storage_dir, table, range(total))
    # files rolled at DELTAFLUSH_MAX_FILE_BYTES (64 KiB of Arrow data)
    assert len(list((storage_dir / "t0").glob("*.parquet"))) > 1


def test_flush_table_returns_a_json_summary(fleet, fleet_env, producer_for, real_redis):
    fleet_env["DELTAFLUSH_FLUSH_AT_BYTES"] = str(2**40)  # no size-triggered flush first
    p = producer_for()
    total = fill(p, batches=5)
    fleet.worker()
    app = make_app(Settings.from_env(fleet_env))
    result = app.send_task("flush_table", args=[TABLE], queue=wire.QUEUE).get(timeout=60)
    assert result["status"] == "ok" and result["rows"] == total
    assert result["files"] >= 1 and result["bytes"] > 0 and result["seconds"] >= 0
    assert wire.parse_id(result["first_id"]) <= wire.parse_id(result["last_id"])
    app.close()


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_loses_and_duplicates_nothing(step, fleet, producer_for,
                                                           real_redis, storage_dir):
    p = producer_for()
    total = fill(p)
    fleet.worker(failpoints=f"{step}=kill")
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    check(f"worker process SIGKILLed at {step}", storage_dir, TABLE, range(total))
    once = Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / step
    assert once.exists(), "the failpoint never fired"
    assert fleet.logged("SIGKILL"), fleet.logs()


def test_whole_worker_killed_mid_flush_is_taken_over(fleet, producer_for, real_redis,
                                                     storage_dir):
    """The worker's every process dies with its task unacknowledged; another worker takes
    the table over after the lease expires, driven by beat."""
    p = producer_for()
    total = fill(p)
    env = dict(fleet.env, DELTAFLUSH_FAILPOINTS="flush.claimed=stop")
    log = fleet.logdir / "doomed.log"
    doomed = fleet.spawn(["worker", "-c", "1", "-n", "doomed@%h", "--loglevel=INFO"], log, env,
                         start_new_session=True)
    marker = Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / "flush.claimed"
    fleet.beat()
    wait_for(marker.exists, 60, "the doomed worker to claim a range")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert real_redis.exists(K.claim)
    fleet.worker()
    wait_drained(fleet, real_redis, total)
    check("whole worker SIGKILLed holding a claim, message unacked", storage_dir, TABLE,
          range(total))


@pytest.mark.parametrize("step", ["flush.first_chunk", "flush.claimed", "flush.published"])
def test_a_worker_frozen_past_its_lease_is_fenced(step, fleet, producer_for, real_redis,
                                                  storage_dir):
    p = producer_for()
    total = fill(p)
    frozen_pid, frozen_log = freeze_and_take_over(fleet, real_redis, total, step)
    assert_exactly_once(storage_dir, TABLE, total)
    os.kill(frozen_pid, signal.SIGCONT)  # it wakes and carries on
    wait_for(lambda: b"fenced" in frozen_log.read_bytes(), 30, "the woken flusher to be fenced")
    check(f"worker frozen past its lease at {step}, woken after takeover", storage_dir, TABLE,
          range(total))
    assert drained(real_redis, total)
    assert int(real_redis.hget(K.stats, "rows")) == total


def test_duplicate_deliveries_to_concurrent_workers(fleet, fleet_env, producer_for, real_redis,
                                                    storage_dir):
    """Two workers with two processes each get 40 flush_table messages for one table while
    a producer keeps appending."""
    p = producer_for()
    fleet.worker(concurrency=2)
    fleet.worker(concurrency=2)
    app = make_app(Settings.from_env(fleet_env))
    done = threading.Event()

    def produce():
        for i in range(80):
            p.append(TABLE, id_batch(i * 50, 50))
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    results = [app.send_task("flush_table", args=[TABLE], queue=wire.QUEUE) for _ in range(40)]
    thread.join()
    summaries = [r.get(timeout=120) for r in results]
    app.send_task("flush_table", args=[TABLE], queue=wire.QUEUE).get(timeout=60)
    wait_drained(fleet, real_redis, 4000)
    check("40 duplicate deliveries to 2 workers x 2 processes, appending meanwhile",
          storage_dir, TABLE, range(4000))
    statuses = {s["status"] for s in summaries}
    assert statuses <= {"ok", "empty", "busy"}
    assert sum(s["rows"] for s in summaries if s["status"] == "ok") <= 4000
    app.close()


def test_storage_error_is_retried_with_backoff(fleet, producer_for, real_redis, storage_dir):
    """A storage write fails once; the task retries by itself and nothing is trimmed first."""
    p = producer_for()
    total = fill(p, batches=10)
    _, log = fleet.worker(failpoints="flush.written=raise")
    p.flush(TABLE)
    wait_drained(fleet, real_redis, total)
    check("storage write error, retried with backoff", storage_dir, TABLE, range(total))
    text = log.read_text()
    assert "injected fault at flush.written" in text and "retry 1 in 1s" in text
    assert not list(storage_dir.rglob("*.tmp"))


@pytest.mark.parametrize("step", ["flush.claimed", "flush.published", "flush.committed"])
def test_partitioned_table_survives_sigkill(step, fleet, producer_for, real_redis,
                                            storage_dir):
    """A range spans several partition files; the kill lands between their publishes."""
    p = producer_for()
    rows = 100
    for i in range(40 * SCALE):
        batch = id_batch(i * rows, rows)
        p.append(TABLE, batch.append_column("bucket", pa.array([j % 5 for j in range(rows)])))
        if i == 0:
            p.configure(TABLE, partition_by="bucket")
    total = 40 * SCALE * rows
    fleet.worker(failpoints=f"{step}=kill")
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    check(f"partitioned table, worker SIGKILLed at {step}", storage_dir, TABLE, range(total))
    folders = {path.parent.name for path in (storage_dir / TABLE).rglob("*.parquet")}
    assert {f"bucket={i}" for i in range(5)} <= folders


def test_beat_is_not_a_single_point_of_failure(fleet, fleet_env, producer_for, real_redis,
                                              storage_dir):
    """Two beat replicas (RedBeat: the schedule and a lock in Redis): the first schedules;
    SIGKILL it, and the standby takes over within a lease period."""
    fleet_env["DELTAFLUSH_FLUSH_AT_BYTES"] = str(2**40)  # only beat schedules here
    p = producer_for()
    fleet.worker()
    leader, leader_log = fleet.beat()
    wait_for(lambda: b"Acquired lock" in leader_log.read_bytes(), 30, "the first beat to lead")
    total = fill(p, "before", batches=5)
    wait_drained(fleet, real_redis, total, "before")
    _, standby_log = fleet.beat()  # blocks on the lock
    leader.kill()
    leader.wait()
    wait_for(lambda: b"Acquired lock" in standby_log.read_bytes(), 30, "the standby to lead")
    total = fill(p, "after", batches=5)
    wait_drained(fleet, real_redis, total, "after")
    check("beat leader SIGKILLed, standby took over", storage_dir, "after", range(total))
