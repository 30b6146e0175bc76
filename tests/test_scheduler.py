"""Scheduling rounds: only tables with something pending, never a second queued flush."""

from producer import Producer, Settings, wire
from tests.conftest import id_batch, wait_for
from workers import lease
from workers.scheduler import due_tables, enqueue_due


def test_only_tables_with_pending_entries_are_due(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    p.append("a", id_batch(0, 1))
    p.append("b", id_batch(0, 1))
    any_redis.sadd("deltaflush:tables", "empty")
    assert sorted(due_tables(any_redis, "deltaflush", 5000)) == ["a", "b"]


def test_a_queued_or_running_table_is_not_queued_again(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    for t in ("a", "b"):
        p.append(t, id_batch(0, 1))
    assert sorted(due_tables(any_redis, "deltaflush", 60_000)) == ["a", "b"]
    assert due_tables(any_redis, "deltaflush", 60_000) == []  # both queued
    any_redis.delete(wire.Keys("deltaflush", "a").queued)  # a's task started...
    held = lease.acquire(any_redis, wire.Keys("deltaflush", "a"), 60_000)  # ...and runs
    assert held is not None
    assert due_tables(any_redis, "deltaflush", 60_000) == []


def test_a_lost_message_only_delays_the_table_by_the_marker_ttl(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    p.append("a", id_batch(0, 1))
    assert due_tables(any_redis, "deltaflush", 60_000) == ["a"]
    # the message is lost; the marker expires
    any_redis.delete(wire.Keys("deltaflush", "a").queued)
    assert due_tables(any_redis, "deltaflush", 60_000) == ["a"]


def test_a_leftover_claim_makes_a_table_due_even_with_an_empty_delta(any_redis):
    k = wire.Keys("deltaflush", "a")
    any_redis.sadd("deltaflush:tables", "a")
    any_redis.hset(k.claim, mapping={"first": "1-0", "last": "1-0", "count": 1})
    assert due_tables(any_redis, "deltaflush", 1000) == ["a"]


def test_failed_send_unmarks_the_table(any_redis):
    Producer(client=any_redis, settings=Settings()).append("a", id_batch(0, 1))

    def send(table):
        raise ConnectionError("broker down")

    try:
        enqueue_due(any_redis, "deltaflush", 60_000, send)
    except ConnectionError:
        pass
    assert not any_redis.exists(wire.Keys("deltaflush", "a").queued)
    sent = []
    assert enqueue_due(any_redis, "deltaflush", 60_000, sent.append) == ["a"] == sent


def test_many_tables_are_checked_in_pipelined_batches(real_redis):
    pipe = real_redis.pipeline()
    for i in range(2500):
        pipe.sadd("deltaflush:tables", f"t{i}")
    pipe.execute()
    p = Producer(client=real_redis, settings=Settings())
    for i in (3, 1500, 2499):
        p.append(f"t{i}", id_batch(0, 1))
    assert sorted(due_tables(real_redis, "deltaflush", 60_000)) == ["t1500", "t2499", "t3"]


def test_each_table_is_scheduled_at_its_own_interval(real_redis):
    p = Producer(client=real_redis, settings=Settings())
    for t in ("fast", "slow"):
        p.append(t, id_batch(0, 1))
    p.configure("fast", flush_interval_s=0.001)
    # both are due the first time
    assert sorted(due_tables(real_redis, "deltaflush", 60_000, interval_ms=3_600_000)) == [
        "fast", "slow"]
    for t in ("fast", "slow"):  # their flushes ran; data is pending again
        real_redis.delete(wire.Keys("deltaflush", t).queued)
    # an hour's default keeps "slow" waiting; "fast" has its own millisecond interval
    assert wait_for(lambda: due_tables(real_redis, "deltaflush", 60_000,
                                       interval_ms=3_600_000), 5, "fast to be due") == ["fast"]
    p.configure("fast", flush_interval_s="default")
    real_redis.delete(wire.Keys("deltaflush", "fast").queued)
    assert due_tables(real_redis, "deltaflush", 60_000, interval_ms=3_600_000) == []


def test_size_trigger_queues_one_flush_when_pending_bytes_pass_the_threshold(
        real_redis, redis_server):
    p = Producer(settings=Settings(redis_url=redis_server.url, flush_at_bytes=10_000))
    p.append("events", id_batch(0, 10))  # small: no flush yet
    assert real_redis.llen(wire.QUEUE) == 0
    p.append_many("events", [id_batch(i * 100, 100) for i in range(1, 6)])
    assert real_redis.llen(wire.QUEUE) == 1  # passed 10 kB: queued at once
    p.append("events", id_batch(600, 100))
    assert real_redis.llen(wire.QUEUE) == 1  # deduplicated: one is already queued
    p.close()
