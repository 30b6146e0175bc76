"""The batching producer (``Producer.batcher``) against a real redis-server: merging,
futures, errors that fail only their own rows, backpressure and a full buffer reaching the
caller, draining on close, the warning at exit; and with real Celery workers, every
acknowledged row landing exactly once, even when the writing process is SIGKILLed with rows
in its buffer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pyarrow as pa
import pytest

from producer import Producer, Settings, wire
from producer.errors import Backpressure, BufferFull, InvalidTableName, SchemaConflict
from tests.conftest import ROOT, assert_exactly_once, landed, read_ids, wait_for
from tests.reliability import record
from workers.flusher import Flusher
from workers.storage import Storage

TABLE = "events"
K = wire.Keys("deltaflush", TABLE)


def row(i: int) -> dict[str, object]:
    return {"id": i, "name": f"n{i}", "value": i * 0.25}


def delta_ids(client, keys=K) -> list[int]:
    """Every ``id`` in the table's delta, in stream order (duplicates kept)."""
    out: list[int] = []
    for _, fields in client.xrange(keys.delta):
        out += pa.ipc.open_stream(fields[b"arrow"]).read_all()["id"].to_pylist()
    return out


@pytest.fixture
def producer(redis_server) -> Producer:
    p = Producer(settings=Settings(redis_url=redis_server.url))
    yield p
    p.close()


def test_rows_are_merged_and_each_future_resolves_to_its_batch(producer, real_redis):
    with producer.batcher(linger_ms=20, max_rows=100) as b:
        futures = [b.write(TABLE, row(i)) for i in range(1000)]
        ids = [f.result(10) for f in futures]
    entries = {e.decode(): int(f[b"rows"]) for e, f in real_redis.xrange(K.delta)}
    assert set(ids) == set(entries) and 10 <= len(entries) < 1000
    assert all(rows <= 100 for rows in entries.values())
    assert sorted(delta_ids(real_redis)) == list(range(1000))
    # each future names the entry that holds its row
    for i in (0, 499, 999):
        held = real_redis.xrange(K.delta, ids[i], ids[i])[0][1][b"arrow"]
        assert i in pa.ipc.open_stream(held).read_all()["id"].to_pylist()


def test_lists_tables_and_rows_of_other_shapes_are_batched_apart(producer, real_redis):
    with producer.batcher(linger_ms=1000) as b:
        f1 = b.write(TABLE, row(0))
        f2 = b.write(TABLE, [row(1), row(2)])
        f3 = b.write(TABLE, pa.Table.from_pylist([row(3)]))
        f4 = b.write(TABLE, {"id": 4, "name": None, "value": 1.0})  # other types: apart
        f5 = b.write("other", row(5))
        results = [f.result(10) for f in (f1, f2, f3, f4, f5)]
    assert results[0] != results[3]  # other value types: another entry
    assert results[1] == results[2]  # a list of dicts and a table of the same schema: merged
    assert sorted(delta_ids(real_redis)) == [0, 1, 2, 3, 4]
    other = wire.Keys("deltaflush", "other")  # (IDs are per stream: compare within one)
    assert [e.decode() for e, _ in real_redis.xrange(other.delta)] == [results[4]]
    assert delta_ids(real_redis, other) == [5]


def test_rows_that_do_not_fit_fail_alone(producer, real_redis):
    producer.append(TABLE, [row(0)])  # the table: id int64, name string, value double
    with producer.batcher(linger_ms=50) as b:
        good = [b.write(TABLE, row(i)) for i in range(1, 50)]
        conflicting = b.write(TABLE, {"id": "seven", "name": "x", "value": 1.0})
        too_big = b.write(TABLE, {"id": 2**70, "name": "x", "value": 1.0})  # same shape
        more = [b.write(TABLE, row(i)) for i in range(50, 100)]
        with pytest.raises(SchemaConflict, match="'id'"):
            conflicting.result(10)
        with pytest.raises(ValueError):
            too_big.result(10)
        assert all(f.result(10) for f in good + more)
    assert sorted(delta_ids(real_redis)) == list(range(100))


def test_a_bad_table_name_or_bad_data_raise_at_write(producer):
    with producer.batcher() as b:
        with pytest.raises(InvalidTableName):
            b.write("_hidden", row(0))
        with pytest.raises(ValueError, match="list of dicts"):
            b.write(TABLE, [1, 2])
    with pytest.raises(RuntimeError, match="closed"):
        b.write(TABLE, row(0))


def test_backpressure_fails_the_futures_of_the_refused_batch(redis_server, real_redis):
    p = Producer(settings=Settings(redis_url=redis_server.url, max_pending_bytes=1))
    p.append(TABLE, [row(0)])  # the table is over its limit: the next append is refused
    with p.batcher(linger_ms=5) as b:
        futures = [b.write(TABLE, row(i)) for i in range(2, 12)]
        for f in futures:
            with pytest.raises(Backpressure):
                f.result(10)
    assert sorted(delta_ids(real_redis)) == [0]
    p.close()


def test_a_full_buffer_blocks_then_raises_buffer_full(producer, real_redis):
    with producer.batcher(linger_ms=0, max_buffer_bytes=2000, max_block_s=0.3) as b:
        b.write(TABLE, row(0)).result(10)  # the table's row size is known now
        real_redis.client_pause(3000, all=True)  # Redis stops answering for 3 s
        accepted: list[Future[str]] = []
        started = time.monotonic()
        with pytest.raises(BufferFull, match="max_buffer_bytes"):
            for i in range(1, 10_000):
                accepted.append(b.write(TABLE, row(i)))
        assert time.monotonic() - started >= 0.3 and 1 <= len(accepted) < 100
        real_redis.client_unpause()
        for f in accepted:
            f.result(30)
    assert sorted(delta_ids(real_redis)) == list(range(len(accepted) + 1))


def test_writes_from_many_threads_land_once(producer, real_redis):
    with producer.batcher(linger_ms=2, max_rows=500) as b:
        futures: list[Future[str]] = []
        lock = threading.Lock()

        def writer(start: int) -> None:
            mine = [b.write(TABLE, row(i)) for i in range(start, start + 2000)]
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=writer, args=(n * 2000,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(f.done() and f.exception() is None for f in futures)  # close() waited
    assert sorted(delta_ids(real_redis)) == list(range(16_000))


def test_exiting_with_rows_unsent_says_how_many(redis_server, tmp_path):
    script = f"""
from producer import Producer, Settings
p = Producer(settings=Settings(redis_url={redis_server.url!r}))
b = p.batcher(linger_ms=60_000)
for i in range(7):
    b.write("events", {{"id": i}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exits with 7 rows written to a batcher not yet acknowledged" in proc.stderr


def test_a_flush_lands_every_row_exactly_once(producer, real_redis, storage_dir):
    with producer.batcher(linger_ms=5) as b:
        futures = [b.write(TABLE, row(i)) for i in range(5000)]
    assert all(f.result() for f in futures)
    result = Flusher(real_redis, Storage(str(storage_dir)), producer.settings).flush(TABLE)
    assert result.rows == 5000
    assert_exactly_once(storage_dir, TABLE, 5000)


# --- with real workers, and a writer killed --------------------------------------------

#: A writer that runs until killed: seqs from 0 through a batcher, each acknowledged seq
#: reported on stdout once its future resolved (so a reported seq was acknowledged).
WRITER = """
import os, sys, threading, queue
from producer import Producer
p = Producer()
b = p.batcher(linger_ms=int(sys.argv[1]))
done = queue.Queue()
def report():
    while True:
        seq, future = done.get()
        future.result()
        os.write(1, b"%d\\n" % seq)
threading.Thread(target=report, daemon=True).start()
seq = 0
while True:
    done.put((seq, b.write("events", {"id": seq, "name": "n", "value": 0.5})))
    seq += 1
    if seq % 1000 == 0:
        while done.qsize() > 20_000:
            threading.Event().wait(0.01)
"""


def kill_a_writer_and_check(command: list[str], env, client, storage_dir, tmp_path) -> None:
    """Run ``command`` (a writer reporting acknowledged seqs on stdout), SIGKILL it once
    it has 20,000 or more acknowledged, let the fleet land the backlog, and check that every
    acknowledged seq landed, none twice, and no gap."""
    out, errors = tmp_path / "acknowledged", tmp_path / "writer.log"
    with out.open("wb") as sink, errors.open("wb") as log:
        writer = subprocess.Popen(command, stdout=sink, stderr=log, env=env)
        wait_for(lambda: out.stat().st_size > 200_000 or writer.poll() is not None, 60,
                 "the writer to have rows acknowledged")
        assert writer.poll() is None, errors.read_text()
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    acknowledged = [int(line) for line in out.read_bytes().split(b"\n")[:-1]]
    assert len(acknowledged) > 20_000
    # nothing writes any more: once the delta is empty and no flush runs, all has landed
    wait_for(lambda: landed(client, TABLE, len(acknowledged)), 120, "the backlog to land")
    ids = read_ids(storage_dir, TABLE)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    record("a producer SIGKILLed with rows in its batcher's buffer", test, len(acknowledged),
           len(set(acknowledged) - set(ids)), len(ids) - len(set(ids)))
    assert len(ids) == len(set(ids)), "a row landed twice"
    assert set(acknowledged) <= set(ids)
    # one sender appends merged batches in order: what landed is the seqs from 0, without
    # a gap, through the last batch Redis accepted (acknowledged or not yet)
    assert ids == list(range(len(ids)))


def test_a_writer_killed_with_rows_in_its_buffer_loses_only_unacknowledged_rows(
        fleet, fleet_env, real_redis, storage_dir, tmp_path):
    fleet.worker()
    fleet.beat()
    kill_a_writer_and_check([sys.executable, "-c", WRITER, "50"], fleet_env, real_redis,
                            storage_dir, tmp_path)


def test_the_fleet_lands_a_batchers_rows_exactly_once(fleet, fleet_env, real_redis,
                                                      storage_dir):
    fleet.worker()
    fleet.beat()
    p = Producer(settings=Settings.from_env(fleet_env))
    with p.batcher(linger_ms=5, max_rows=1000) as b:
        futures = [b.write(TABLE, row(i)) for i in range(20_000)]
    assert all(f.result() for f in futures)
    wait_for(lambda: landed(real_redis, TABLE, 20_000), 120, "20,000 rows to land")
    assert_exactly_once(storage_dir, TABLE, 20_000)
    p.close()


def test_write_futures_work_with_wait_as_completed_and_callbacks(producer, real_redis):
    import concurrent.futures as cf

    with producer.batcher(linger_ms=200) as b:
        futures = [b.write(TABLE, row(i)) for i in range(10)]
        called: list[str] = []
        futures[0].add_done_callback(lambda f: called.append(f.result()))
        with pytest.raises(cf.TimeoutError):
            futures[1].result(timeout=0.01)  # still lingering
        assert not futures[1].cancel() and not futures[1].done()
        done, pending = cf.wait(futures, timeout=30)
        assert len(done) == 10 and not pending
        assert sorted(f.result() for f in cf.as_completed(futures)) == \
            [futures[0].result()] * 10
        futures[2].add_done_callback(lambda f: called.append("late"))  # runs at once
    assert called == [futures[0].result(), "late"]


def test_a_forked_child_starts_empty_and_sends_its_own_writes_once(producer, real_redis):
    with producer.batcher(linger_ms=60_000) as b:
        parents = [b.write(TABLE, row(i)) for i in range(10)]  # buffered, lingering
        pid = os.fork()
        if pid == 0:  # the child: its copy of the buffer must not be sent again
            code = 1
            try:
                assert b.unacknowledged == 0
                mine = [b.write(TABLE, row(i)) for i in range(100, 105)]
                b.close()
                code = 0 if all(f.result() for f in mine) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert all(f.result() for f in parents)
    assert sorted(delta_ids(real_redis)) == [*range(10), *range(100, 105)]
