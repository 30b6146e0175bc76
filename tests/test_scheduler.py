"""Scheduling rounds: only tables with something pending, never a second queued flush."""

import pytest

from producer import Producer, Settings, wire
from tests.conftest import id_batch, read_ids, wait_for
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


def test_a_flush_request_in_redis_makes_a_table_due_once(any_redis):
    """docs/spec.md, "Requesting a flush": one HSET, honoured by the next round whatever the
    table's interval, then cleared."""
    p = Producer(client=any_redis, settings=Settings())
    k = wire.Keys("deltaflush", "a")
    hour = 3_600_000
    p.append("a", id_batch(0, 1))
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == ["a"]  # first
    any_redis.delete(k.queued)  # its flush started
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == []
    any_redis.hset(k.sched, "flush_requested", "1")
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == ["a"]
    assert not any_redis.hexists(k.sched, "flush_requested")
    any_redis.delete(k.queued)
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == []  # used up


def test_a_flush_request_waits_for_a_running_flush_and_is_met_by_a_queued_one(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    k = wire.Keys("deltaflush", "a")
    hour = 3_600_000
    p.append("a", id_batch(0, 1))
    held = lease.acquire(any_redis, k, 60_000)  # a flush is running: it may have read past
    assert held is not None
    p.request_flush("a")
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == []
    assert any_redis.hexists(k.sched, "flush_requested")  # kept for after it
    any_redis.delete(k.lease)
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == ["a"]
    p.request_flush("a")  # a flush is queued, not started: it will see everything
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == []
    assert not any_redis.hexists(k.sched, "flush_requested")
    any_redis.delete(k.queued)
    p.request_flush("a")
    any_redis.xtrim(k.delta, maxlen=0)  # nothing pending: nothing to do, request met
    assert due_tables(any_redis, "deltaflush", 60_000, interval_ms=hour) == []
    assert not any_redis.hexists(k.sched, "flush_requested")


def test_a_flush_request_needs_no_registration_of_its_own(any_redis):
    """docs/spec.md, "Requesting a flush": no SADD before the HSET. A table with something
    pending was registered by its first append; a request for a table that is not
    registered is never read (and registers nothing), and a later registration with nothing
    pending drops it."""
    p = Producer(client=any_redis, settings=Settings())
    p.append("a", id_batch(0, 1))
    assert due_tables(any_redis, "deltaflush", 60_000) == ["a"]
    any_redis.delete(wire.Keys("deltaflush", "a").queued)
    Producer(client=any_redis, settings=Settings()).request_flush("a")  # a new process
    assert due_tables(any_redis, "deltaflush", 60_000) == ["a"]
    ghost = wire.Keys("deltaflush", "ghost")
    p.request_flush("ghost")
    assert due_tables(any_redis, "deltaflush", 60_000) == []
    assert any_redis.smembers("deltaflush:tables") == {b"a"}
    assert any_redis.hexists(ghost.sched, "flush_requested")  # left, harmless
    any_redis.sadd("deltaflush:tables", "ghost")  # registered, nothing appended yet
    assert due_tables(any_redis, "deltaflush", 60_000) == []
    assert not any_redis.hexists(ghost.sched, "flush_requested")


@pytest.mark.integration
def test_a_flush_requested_through_redis_alone_is_run_by_the_fleet(
        fleet, real_redis, storage_dir):
    """A producer in any language asks for a flush with one HSET: no Celery message. With an
    hour's flush interval, only the request can flush the second batch."""
    fleet.env["DELTAFLUSH_FLUSH_INTERVAL_S"] = "3600"
    fleet.worker()
    fleet.beat()
    k = wire.Keys("deltaflush", "events")
    p = Producer(settings=Settings.from_env(fleet.env))
    p.append("events", id_batch(0, 10))  # a table never scheduled is due at once
    wait_for(lambda: read_ids(storage_dir, "events") == list(range(10)), 60,
             "the first scheduled flush", interval=0.2)
    p.append("events", id_batch(10, 10))
    real_redis.hset(k.sched, "flush_requested", "1")
    wait_for(lambda: read_ids(storage_dir, "events") == list(range(20)), 60,
             "the requested flush", interval=0.2)
    assert not real_redis.hexists(k.sched, "flush_requested")
    p.close()
