"""Outages: Redis killed and restarted, storage down, graceful worker shutdown. Real
redis-server and real ``celery -A workers.app`` processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import redis

from producer import Producer, Settings, wire
from tests.conftest import id_batch, own_fleet, wait_for
from tests.reliability import check, record
from tests.test_fleet import TABLE, drained, fill, wait_drained

pytestmark = pytest.mark.integration
K = wire.Keys("deltaflush", TABLE)


def test_redis_killed_and_restarted_loses_no_acknowledged_append(durable_redis, fleet_env,
                                                                 tmp_path, storage_dir):
    """SIGKILL Redis (AOF, appendfsync always) while a producer appends and a fleet flushes:
    every append that returned lands exactly once. The producer reconnects by itself; a
    Celery worker usually does too, but sometimes exits with "Unrecoverable error" when the
    broker connection drops mid-read (Celery/kombu, see docs/operations.md), so the test
    restarts exited workers as a supervisor would."""
    env = dict(fleet_env, DELTAFLUSH_REDIS_URL=durable_redis.url)
    with own_fleet(env, tmp_path) as fleet:
        fleet.worker(concurrency=2)
        fleet.beat()
        p = Producer(settings=Settings.from_env(env))
        acked: list[int] = []
        failed: list[int] = []
        half = threading.Event()

        def produce() -> None:
            for i in range(120):
                try:
                    p.append(TABLE, id_batch(i * 50, 50))
                    acked.append(i)
                except redis.RedisError:
                    failed.append(i)
                if i == 40:
                    half.set()

        thread = threading.Thread(target=produce)
        thread.start()
        half.wait(60)
        durable_redis.stop(signal.SIGKILL)
        durable_redis.start()
        thread.join()
        client = redis.Redis.from_url(durable_redis.url)
        expected = {i * 50 + j for i in acked for j in range(50)}
        try:
            wait_for(lambda: fleet.restart_dead_workers() >= 0 and client.xlen(K.delta) == 0
                     and not client.exists(K.claim) and not client.exists(K.lease), 90,
                     "the fleet to drain after a restart")
        except BaseException:
            print(fleet.logs())
            raise
        attempted = {i * 50 + j for i in acked + failed for j in range(50)}
        check("Redis SIGKILLed and restarted (AOF always) under load", storage_dir, TABLE,
              attempted, must_have=expected)
        print(f"acked {len(acked)}, failed {len(failed)}, workers restarted {fleet.restarts}")
        assert len(acked) >= 100  # the producer's retries bridged the restart
        p.close()
        client.close()


def test_storage_down_trims_nothing_and_everything_lands_when_it_returns(
        fleet, fleet_env, producer_for, real_redis, tmp_path):
    blocked = tmp_path / "mnt"
    blocked.mkdir()
    fleet.env["DELTAFLUSH_STORAGE_URI"] = str(blocked / "lake")
    _, log = fleet.worker()  # storage is up at start (a worker stops if it is not)
    shutil.rmtree(blocked)
    blocked.write_text("not a folder: the storage mount is gone")
    p = producer_for()
    total = fill(p, batches=10)
    fleet.beat()
    wait_for(lambda: b"retry 2 in" in log.read_bytes(), 60, "flushes to fail and retry")
    assert real_redis.xlen(K.delta) == total // 100  # nothing trimmed
    assert real_redis.hget(K.pending, "rows") == str(total).encode()
    blocked.unlink()
    blocked.mkdir()
    wait_drained(fleet, real_redis, total, timeout=90)
    check("storage unavailable, then back", blocked / "lake", TABLE, range(total))


def test_sigterm_finishes_the_current_file_and_hands_the_rest_over(fleet, producer_for,
                                                                   real_redis, storage_dir):
    p = producer_for()
    total = fill(p, batches=80)  # about 5 files at 64 KiB
    proc, log = fleet.worker(failpoints="flush.committed=sleep:0.5")
    p.flush(TABLE)
    wait_for(lambda: int(real_redis.hget(K.stats, "files") or 0) >= 1, 60, "a first file")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, 60, "the worker to exit after SIGTERM")
    assert proc.returncode == 0, log.read_text()
    assert not real_redis.exists(K.claim)  # it stopped between files, not mid-file
    assert real_redis.xlen(K.delta) > 0  # and left the rest
    fleet.worker()
    fleet.beat()
    wait_drained(fleet, real_redis, total)
    check("SIGTERM to a worker mid-flush", storage_dir, TABLE, range(total))
    assert drained(real_redis, total)


PRODUCER_LOOP = """
import sys
from producer import Producer
from tests.conftest import id_batch
p = Producer(redis_url=sys.argv[1])
start = 0
while True:
    p.append_many("events", [id_batch(start + i * 500, 500, "x" * 200) for i in range(20)])
    start += 10_000
"""


@pytest.mark.parametrize("kill_after_entries", [1, 150, 400])
def test_producer_killed_mid_append_many_leaves_only_whole_counted_batches(
        redis_server, real_redis, tmp_path, kill_after_entries):
    """SIGKILL a producer process in the middle of pipelined appends (its transactions
    half-sent): every entry in the stream is a whole, decodable batch, each batch is there
    once, and the pending counters match the stream exactly."""
    log = tmp_path / "producer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", PRODUCER_LOOP, redis_server.url],
                                stdout=out, stderr=subprocess.STDOUT)
    keys = wire.Keys("deltaflush", "events")
    try:
        wait_for(lambda: real_redis.xlen(keys.delta) >= kill_after_entries or
                 proc.poll() is not None, 60, "the producer to append")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    entries = real_redis.xrange(keys.delta)
    rows = [wire.decode_payload(f[wire.FIELD_ARROW]).num_rows for _, f in entries]
    assert rows and set(rows) == {500}
    assert len({f[wire.FIELD_BATCH] for _, f in entries}) == len(entries)
    firsts = [wire.decode_payload(f[wire.FIELD_ARROW]).column("id")[0].as_py()
              for _, f in entries]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    assert int(real_redis.hget(keys.pending, "rows")) == sum(rows)
    assert int(real_redis.hget(keys.pending, "bytes")) == sum(
        len(f[wire.FIELD_ARROW]) for _, f in entries)
    assert real_redis.sismember(wire.tables_key("deltaflush"), "events")
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    record("producer SIGKILLed mid append_many (half-sent transactions)", test, sum(rows),
           0, len(entries) - len({f[wire.FIELD_BATCH] for _, f in entries}))
