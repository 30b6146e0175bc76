"""Failovers on a real Redis Cluster: a flusher's writes that a failover forgets, lost by
cutting the replica's link just before its master dies; each test on a cluster of its own.

Redis replicates asynchronously, so a master that dies takes with it whatever its replica
had not received yet. For the flush protocol that is the claim (the promoted replica has the
entries but not the claim: the next flush forms another range over the same rows, so rows
already in a published file are written again) and the trim (the promoted replica still has
entries a file holds). ``DELTAFLUSH_APPEND_REPLICAS=1`` makes the flusher wait for the
replica after its lease and each claim, before it publishes anything; a forgotten trim
brings back the claim, whose range the sink already holds (idempotent by range): a Parquet
file named after the range, an Iceberg or Delta commit recorded by range. The lake tables are
read back by independent readers (DuckDB's ``iceberg_scan`` and ``delta_scan``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from producer import Producer, Settings, wire
from producer.client import connect
from tests.conftest import id_batch, landed, wait_for
from tests.lake import table_ids
from tests.reliability import check_ids
from workers.flusher import Flusher
from workers.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
TABLE = "events"
BROKER = "amqp://guest:guest@127.0.0.1:5672//"  # never reached: flushes run --local


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` is stopped (SIGSTOP, state T in /proc)."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("stop_at, flusher_replicas, outcome, fmt", [
    # without waiting for the replica, the claim and the trim die with the master: the rows
    # of the published file come back, in a range of another name (the hazard)
    ("flush.leased", 0, "duplicated", "parquet"),
    # waiting: the claim is not acknowledged, so nothing is published; the flush fails
    ("flush.leased", 1, "refused", "parquet"),
    ("flush.leased", 1, "refused", "iceberg"),
    ("flush.leased", 1, "refused", "delta"),
    # waiting: the claim is on the replica, the trim is not; the next flush resumes the
    # claim and rewrites the same file, or finds the range in the lake table's commits
    ("flush.claimed", 1, "resumed", "parquet"),
    ("flush.claimed", 1, "resumed", "iceberg"),
    ("flush.claimed", 1, "resumed", "delta"),
])
@pytest.mark.timeout(240)
def test_a_failover_that_forgets_the_flushers_writes(own_cluster, tmp_path, stop_at,
                                                     flusher_replicas, outcome, fmt):
    cluster = own_cluster
    storage = tmp_path / "lake"
    settings = Settings(redis_url=cluster.url, broker_url=BROKER, storage_uri=str(storage),
                        append_replicas=1, append_replicas_timeout_ms=2000)
    p = Producer(settings=settings)
    if fmt != "parquet":
        p.configure(TABLE, format=fmt)
    for i in range(20):  # every one of them on the replica too (append_replicas=1)
        p.append(TABLE, id_batch(i * 10, 10))
    keys = wire.Keys(settings.key_prefix, TABLE)
    master = cluster.master_of(keys.delta)
    replica = cluster.replica_of(master)

    # A flusher of its own (`deltaflush flush --local`) that freezes itself at `stop_at`.
    once = tmp_path / "once"
    once.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DELTAFLUSH_REDIS_URL=cluster.url,
               DELTAFLUSH_BROKER_URL=BROKER, DELTAFLUSH_STORAGE_URI=str(storage),
               DELTAFLUSH_APPEND_REPLICAS=str(flusher_replicas),
               DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS="2000",
               DELTAFLUSH_FAILPOINTS=f"{stop_at}=stop", DELTAFLUSH_FAILPOINT_ONCE_DIR=str(once))
    flusher = subprocess.Popen(
        [str(Path(sys.executable).with_name("deltaflush")), "flush", TABLE, "--local"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: stopped(flusher) or flusher.poll() is not None, 60,
                 f"the flusher to stop at {stop_at}")
        assert flusher.poll() is None, flusher.communicate()[0]
        # cut the replica off, then let the flusher go on against the master alone
        cluster.cut_off(replica)
        flusher.send_signal(signal.SIGCONT)
        out = flusher.communicate(timeout=120)[0].decode()
    finally:
        if flusher.poll() is None:
            flusher.kill()
            flusher.wait()
    if outcome == "refused":
        assert flusher.returncode == 1, out
        assert "replicas" in out and "DELTAFLUSH_APPEND_REPLICAS" in out, out
        assert table_ids(storage, TABLE, fmt) == []  # nothing published
    else:
        assert flusher.returncode == 0, out
        assert len(table_ids(storage, TABLE, fmt)) == 200  # published and trimmed, on the master

    # the master dies before its replica has any of that; the replica takes over
    cluster.kill(master)
    cluster.resume(replica)
    cluster.takeover(replica)
    cluster.restart(master)  # it rejoins as the replica of the new master, resynced from it
    cluster.wait_healthy()

    # appends go on (the producer finds the new master), then a flush drains everything
    for i in range(20, 30):
        p.append(TABLE, id_batch(i * 10, 10))
    client = connect(replica.url)
    healthy = Settings(redis_url=replica.url, broker_url=BROKER, storage_uri=str(storage),
                       append_replicas=0)
    after = Flusher(client, Storage(str(storage)), healthy)
    if outcome == "resumed":  # the claim survived the failover, the trim did not
        assert client.exists(keys.claim) and client.xlen(keys.delta) == 30
    else:
        assert not client.exists(keys.claim)
    wait_for(lambda: after.flush(TABLE).status in ("ok", "empty")
             and landed(client, TABLE, 0, settings.key_prefix), 60, "the table to drain")
    ids = table_ids(storage, TABLE, fmt)
    if outcome == "resumed" and fmt != "parquet":  # the sink found the range committed
        assert int(client.hget(keys.stats, "lake_already") or 0) >= 1
    if outcome == "duplicated":  # the hazard the waits prevent: shown, not recorded
        assert set(ids) == set(range(300))
        assert len(ids) - len(set(ids)) == 200, "the hazard the waits prevent did not show"
    else:
        reader = {"parquet": "", "iceberg": "iceberg: ", "delta": "delta: "}[fmt]
        check_ids(f"{reader}cluster: replica link cut at {stop_at}, then its master SIGKILLed "
                  "(flusher waits for replicas)", ids, range(300), None,
                  lambda missing: f"{len(missing)} rows lost")
    p.close()
    client.close()
