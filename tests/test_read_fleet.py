"""The property of ``Producer.read`` under real fleets: whatever flushes, compactions,
worker kills and frozen workers do meanwhile, every read is exactly one prefix of what was
appended.

One producer thread appends batches of a sequence column (``id``: 0, 1, 2, ... in append
order) as fast as Redis takes them; ``celery -A workers.app worker`` processes (solo pool:
one process each, so a SIGKILL kills the flush it runs) and ``beat`` flush the table every
0.2 s in files of 64 KiB; for lake formats a thread runs ``deltaflush compact`` over and
over. Hypothesis draws the schedule of the test thread: reads, SIGKILLs of a worker (a
supervisor restarts it), SIGSTOPs of a worker for 3 s (past its 2 s lease: if it held a
table, it wakes a zombie), flushes asked for, pauses. Each read must hold the ids
``{0..k}`` exactly once, for some ``k`` at least the number of rows acknowledged before
the read started (read-your-writes). A sharded table (3 shards, batches round-robin) is
read one shard after the other: each read holds every id acknowledged before it, exactly
once. At the end, once the table drained, a read holds every row appended, exactly once.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import Producer, wire
from tests.conftest import Fleet, id_batch, wait_for
from tests.reliability import SCALE, record

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DELTAFLUSH = str(Path(sys.executable).with_name("deltaflush"))
_tables = itertools.count()

STEPS = st.lists(st.one_of(
    st.just(("read",)), st.just(("read",)), st.just(("read",)),
    st.just(("kill",)),
    st.just(("freeze",)),
    st.just(("flush",)),
    st.tuples(st.just("pause"), st.floats(0.0, 0.3)),
), min_size=6, max_size=20)


class Appender(threading.Thread):
    """Appends ``id_batch``es of 1-300 rows back to back; ``acked`` is how many rows
    ``append`` acknowledged (ids ``0..acked-1``)."""

    def __init__(self, producer: Producer, table: str) -> None:
        super().__init__(daemon=True)
        self.producer, self.table = producer, table
        self.acked = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        sizes = itertools.cycle([1, 37, 300, 5, 120, 64])
        try:
            while not self.stop.is_set():
                rows = next(sizes)
                self.producer.append(self.table, id_batch(self.acked, rows))
                self.acked += rows
                time.sleep(0.002)  # pacing, so the backlog stays within a few files
        except BaseException as exc:
            self.error = exc


class Compactor(threading.Thread):
    """Runs ``deltaflush compact TABLE`` over and over (lake formats)."""

    def __init__(self, env: dict[str, str], table: str) -> None:
        super().__init__(daemon=True)
        self.env, self.table = env, table
        self.stop = threading.Event()
        self.rewrites = 0  # runs that rewrote files
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            proc = subprocess.run([DELTAFLUSH, "compact", self.table], env=self.env,
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                self.failures.append(proc.stdout + proc.stderr)
            elif self.rewrote(proc.stdout):
                self.rewrites += 1

    def rewrote(self, out: str) -> bool:
        """Whether a run rewrote files: it says so for an Iceberg table; a Delta table's
        history shows an OPTIMIZE (its compaction's summary has other names, and the
        command prints 0 rewritten for it)."""
        if not out.startswith(f"{self.table}: 0 files rewritten"):
            return True
        from deltalake import DeltaTable

        path = Path(self.env["DELTAFLUSH_STORAGE_URI"]) / self.table
        return (path / "_delta_log").exists() and any(
            h.get("operation") == "OPTIMIZE" for h in DeltaTable(str(path)).history())


def check_prefix(p: Producer, table: str, acked_before: int, what: str,
                 sharded: bool = False) -> int:
    """The read holds ids ``0..k-1`` exactly once, ``k >= acked_before``. A sharded table's
    snapshot is one per shard, taken one after the other: it holds every id acknowledged
    before it started, exactly once, and maybe some appended while it ran."""
    got = p.read(table, columns=["id"]).read_all()["id"].to_pylist()
    dupes = len(got) - len(set(got))
    lost = len(set(range(acked_before)) - set(got))
    record(f"{what}: a read (flushes, compactions, SIGKILL and SIGSTOP of workers)",
           os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], acked_before, lost, dupes)
    assert dupes == 0, f"{what}: {dupes} rows read twice"
    if sharded:
        missing = sorted(set(range(acked_before)) - set(got))
        assert not missing, f"{what}: acknowledged ids missing, e.g. {missing[:5]}"
        return len(got)
    missing = sorted(set(range(len(got))) - set(got))
    assert not missing, f"{what}: ids missing below {len(got)}, e.g. {missing[:5]}"
    assert len(got) >= acked_before, \
        f"{what}: read {len(got)} rows, but {acked_before} were acknowledged before the read"
    return len(got)


def drained_shard(client: Any, keys: wire.Keys) -> bool:
    return (client.xlen(keys.delta) == 0 and not client.exists(keys.claim)
            and not client.exists(keys.lease))


def freeze_a_worker(fleet: Fleet, seconds: float) -> threading.Timer | None:
    """SIGSTOP a worker for ``seconds`` (past its 2 s lease: another worker takes its table
    over, and it wakes a zombie whose commits must change nothing)."""
    alive = [proc for proc, concurrency, _ in fleet.workers if concurrency and
             proc.poll() is None]
    if not alive:
        return None
    proc = alive[-1]
    proc.send_signal(signal.SIGSTOP)
    timer = threading.Timer(seconds, lambda: proc.poll() is None and
                            proc.send_signal(signal.SIGCONT))
    timer.start()
    return timer


def kill_a_worker(fleet: Fleet) -> None:
    alive = [proc for proc, concurrency, _ in fleet.workers if concurrency and
             proc.poll() is None]
    if alive:
        alive[0].send_signal(signal.SIGKILL)
        alive[0].wait()
    fleet.restart_dead_workers()


@pytest.mark.timeout(300 * SCALE)  # examples scale with DELTAFLUSH_CHAOS_SCALE (make chaos)
@pytest.mark.parametrize("fmt,shards", [("parquet", 1), ("iceberg", 1), ("delta", 1),
                                        ("parquet", 3), ("delta", 3)])
def test_every_read_is_one_prefix_of_what_was_appended(fmt, shards, fleet, fleet_env,
                                                       producer_for, real_redis):
    fleet.worker(pool="solo")
    fleet.worker(pool="solo")
    fleet.beat()
    p = producer_for()
    stats: dict[str, Any] = {"reads": 0, "both_tiers": 0, "kills": 0, "freezes": 0,
                             "longest": 0, "compactions": 0}

    @settings(max_examples=3 * SCALE, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(STEPS)
    def schedule(steps: list[tuple[Any, ...]]) -> None:
        table = f"events{next(_tables)}"
        p.configure(table, format=fmt, flush_interval_s=0.2, target_file_bytes=1 << 20,
                    shards=shards)
        appender = Appender(p, table)
        appender.start()
        compactor = Compactor(fleet_env, table) if fmt != "parquet" else None
        keys = wire.Keys("deltaflush", table)
        wait_for(lambda: any(real_redis.hget(keys.for_shard(i).stats, "rows")
                             for i in range(shards)), 30, "a first flush")
        if compactor is not None:
            compactor.start()
        timers: list[threading.Timer] = []
        try:
            for step in steps:
                if step[0] == "read":
                    both = (any(real_redis.hget(keys.for_shard(i).stats, "rows")
                                for i in range(shards))
                            and any(real_redis.xlen(keys.for_shard(i).delta)
                                    for i in range(shards)))
                    n = check_prefix(p, table, appender.acked, f"{fmt} read during flushes",
                                     shards > 1)
                    stats["reads"] += 1
                    stats["both_tiers"] += both
                    stats["longest"] = max(stats["longest"], n)
                elif step[0] == "kill":
                    kill_a_worker(fleet)
                    stats["kills"] += 1
                elif step[0] == "freeze":
                    timer = freeze_a_worker(fleet, 3.0)
                    if timer is not None:
                        timers.append(timer)
                        stats["freezes"] += 1
                elif step[0] == "flush":
                    p.flush(table)
                else:
                    time.sleep(step[1])
                assert appender.error is None, appender.error
            # and reads while compactions commit: until one rewrote files
            deadline = time.monotonic() + 90
            while compactor is not None and not compactor.rewrites and \
                    time.monotonic() < deadline:
                check_prefix(p, table, appender.acked, f"{fmt} read during compactions",
                             shards > 1)
                time.sleep(0.1)
        finally:
            for timer in timers:  # every frozen worker woken before the drain
                timer.join()
            appender.stop.set()
            appender.join(30)
            if compactor is not None:
                compactor.stop.set()
                compactor.join(150)
        assert appender.error is None, appender.error
        total = appender.acked
        try:
            wait_for(lambda: fleet.restart_dead_workers() >= 0 and all(
                drained_shard(real_redis, keys.for_shard(i)) for i in range(shards)),
                120, f"{table} to drain")
        except BaseException:
            print(fleet.logs())
            raise
        assert check_prefix(p, table, total, f"{fmt} read once drained") == total
        if compactor is not None:
            assert not compactor.failures, compactor.failures[0]
            stats["compactions"] += compactor.rewrites

    schedule()
    # reads found rows in the lake and in the delta (flushed and pending at their start)
    assert stats["both_tiers"] > 0 and stats["longest"] > 0
    assert stats["kills"] > 0
    assert fmt == "parquet" or stats["compactions"] > 0  # compactions committed meanwhile
    print(f"{fmt}: {stats}")
