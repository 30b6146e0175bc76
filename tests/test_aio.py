"""The asyncio producer (``AsyncProducer``) against a real redis-server, beside the blocking
one on the same tables; its batcher; and with real Celery workers, every acknowledged row
landing exactly once, even when the writing process is SIGKILLed with rows in its buffer."""

from __future__ import annotations

import asyncio
import sys

import pyarrow as pa
import pytest

from producer import AsyncProducer, Producer, Settings, wire
from producer.errors import Backpressure, BufferFull, InvalidTableName, SchemaConflict
from tests.conftest import assert_exactly_once, id_batch, landed, wait_for
from tests.test_batcher import delta_ids, kill_a_writer_and_check, row

TABLE = "events"
K = wire.Keys("deltaflush", TABLE)


def run(coro):
    return asyncio.run(coro)


def test_append_and_append_many_share_the_table_with_the_blocking_producer(
        redis_server, real_redis):
    sync = Producer(settings=Settings(redis_url=redis_server.url))
    sync.append(TABLE, id_batch(0, 10))

    async def main() -> list[str]:
        async with AsyncProducer(settings=Settings(redis_url=redis_server.url)) as ap:
            first = await ap.append(TABLE, id_batch(10, 10))
            # an evolution (a new column), then batches in the evolved shape
            more = await ap.append_many(TABLE, [id_batch(20, 10).append_column(
                "extra", pa.array([1] * 10, pa.int64())), id_batch(30, 10)])
            with pytest.raises(SchemaConflict, match="'id'"):
                await ap.append(TABLE, [{"id": "x"}])
            return [first, *more]

    ids = run(main())
    sync.append(TABLE, id_batch(40, 10))  # the blocking producer takes the evolved schema
    entries = [e.decode() for e, _ in real_redis.xrange(K.delta)]
    assert entries[1:4] == ids and len(entries) == 5
    assert sorted(delta_ids(real_redis)) == list(range(50))
    assert b'"extra"' in real_redis.get(K.schema)
    sync.close()


def test_backpressure_and_waiting_for_room(redis_server, real_redis):
    async def main() -> None:
        ap = AsyncProducer(settings=Settings(redis_url=redis_server.url, max_pending_bytes=1))
        await ap.append(TABLE, [row(0)])
        with pytest.raises(Backpressure):
            await ap.append(TABLE, [row(1)])
        waiting = asyncio.create_task(ap.append(TABLE, [row(1)], timeout_s=30))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        real_redis.hset(K.pending, "bytes", 0)  # as a flush would
        await waiting
        await ap.close()

    run(main())
    assert sorted(delta_ids(real_redis)) == [0, 1]


def test_the_batcher_merges_and_rows_that_do_not_fit_fail_alone(redis_server, real_redis):
    async def main() -> None:
        ap = AsyncProducer(settings=Settings(redis_url=redis_server.url))
        await ap.append(TABLE, [row(0)])
        async with ap.batcher(linger_ms=20, max_rows=100) as b:
            futures = [b.write(TABLE, row(i)) for i in range(1, 1000)]
            bad = b.write(TABLE, {"id": "seven", "name": "x", "value": 1.0})
            too_big = b.write(TABLE, {"id": 2**70, "name": "x", "value": 1.0})
            listed = b.write(TABLE, [row(1000), row(1001)])
            with pytest.raises(InvalidTableName):
                b.write("_hidden", row(0))
            ids = await asyncio.gather(*futures, listed)
            with pytest.raises(SchemaConflict):
                await bad
            with pytest.raises(ValueError):
                await too_big
        assert 10 <= len(set(ids)) < 1000
        with pytest.raises(RuntimeError, match="closed"):
            b.write(TABLE, row(0))
        await ap.close()

    run(main())
    assert sorted(delta_ids(real_redis)) == list(range(1002))


def test_a_full_buffer_raises_at_once(redis_server, real_redis):
    async def main() -> int:
        ap = AsyncProducer(settings=Settings(redis_url=redis_server.url))
        async with ap.batcher(linger_ms=60_000, max_buffer_bytes=2000) as b:
            futures = []
            with pytest.raises(BufferFull):
                for i in range(10_000):
                    futures.append(b.write(TABLE, row(i)))
            await asyncio.gather(*futures)  # what was buffered is sent at once
        await ap.close()
        return len(futures)

    written = run(main())
    assert 1 <= written < 100
    assert sorted(delta_ids(real_redis)) == list(range(written))


def test_the_fleet_lands_the_async_batchers_rows_exactly_once(fleet, fleet_env, real_redis,
                                                            storage_dir):
    fleet.worker()

    async def main() -> None:
        async with AsyncProducer(settings=Settings.from_env(fleet_env)) as ap:
            await ap.append(TABLE, [row(0)])
            assert await ap.flush(TABLE)  # no beat: only this flush lands the row
            await asyncio.to_thread(wait_for, lambda: landed(real_redis, TABLE, 1), 60)
            async with ap.batcher(linger_ms=5) as b:
                futures = [b.write(TABLE, row(i)) for i in range(1, 20_000)]
            assert all(f.result() for f in futures)
            # the size trigger queued flushes on the way; this one (or one queued already)
            # takes the rest
            await ap.flush(TABLE)

    run(main())
    wait_for(lambda: landed(real_redis, TABLE, 20_000), 120, "20,000 rows to land")
    assert_exactly_once(storage_dir, TABLE, 20_000)


#: An asyncio writer that runs until killed, reporting each acknowledged seq on stdout.
WRITER = """
import asyncio, os
from producer import AsyncProducer

async def main():
    ap = AsyncProducer()
    b = ap.batcher(linger_ms=50)
    async def report(seq, future):
        await future
        os.write(1, b"%d\\n" % seq)
    seq = 0
    while True:
        for _ in range(500):
            future = b.write("events", {"id": seq, "name": "n", "value": 0.5})
            asyncio.ensure_future(report(seq, future))
            seq += 1
        await asyncio.sleep(0)
        while b.unacknowledged > 20_000:
            await asyncio.sleep(0.01)

asyncio.run(main())
"""


def test_an_async_writer_killed_with_rows_in_its_buffer_loses_only_unacknowledged_rows(
        fleet, fleet_env, real_redis, storage_dir, tmp_path):
    fleet.worker()
    fleet.beat()
    kill_a_writer_and_check([sys.executable, "-c", WRITER], fleet_env, real_redis,
                            storage_dir, tmp_path)
