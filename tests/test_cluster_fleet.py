"""A fleet on a Redis Cluster of its own while the cluster changes under it: real `celery -A
workers.app worker` and beat processes with RabbitMQ as the broker, producers appending
with ``DELTAFLUSH_APPEND_REPLICAS=1``, and (1) a master SIGKILLed mid-run while its replica
is promoted, (2) a table's slot migrated to another master key by key, (3) slots, the table's
among them, moved by the real ``redis-cli --cluster reshard``. Every row whose append returned
lands exactly once; no row is duplicated."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from redis.cluster import key_slot

from producer import DeltaflushError, Producer, ReplicationTimeout, Settings, wire
from tests.cluster import cluster_fleet_env
from tests.conftest import Fleet, id_batch, landed, own_fleet, read_ids, wait_for
from tests.reliability import check_ids

TABLES = [f"t{i}" for i in range(6)]
BATCH_ROWS = 20


class Appender(threading.Thread):
    """Appends batches of distinct ids to every table in turn until stopped; an append that
    fails for replicas is retried with its batch ID (never added twice), others count as
    unknown (they may or may not be in). ``acked`` holds the first id of every batch whose
    append returned. It stops after ``batches`` rounds, or after the round during which
    ``stop`` is set."""

    def __init__(self, producer: Producer, batches: int,
                 tables: list[str] | None = None) -> None:
        super().__init__(daemon=True)
        self.producer = producer
        self.batches = batches
        self.tables = list(tables or TABLES)
        self.acked: dict[str, list[int]] = {t: [] for t in self.tables}
        self.unknown: dict[str, list[int]] = {t: [] for t in self.tables}
        self.done = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for n in range(self.batches):
            if self.stop.is_set():
                break
            for table in self.tables:
                start = n * BATCH_ROWS
                data = id_batch(start, BATCH_ROWS)
                batch_id: str | None = None
                deadline = time.monotonic() + 90
                while True:
                    try:
                        self.producer.append(table, data, batch_id=batch_id)
                        self.acked[table].append(start)
                        break
                    except ReplicationTimeout as exc:  # the same batch again, with its ID
                        batch_id = exc.batch_ids[0]
                        if time.monotonic() > deadline:
                            self.unknown[table].append(start)
                            self.errors.append(str(exc))
                            break
                    except (redis.RedisError, DeltaflushError) as exc:
                        self.unknown[table].append(start)
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        break
            self.done = n + 1


class Supervised(Fleet):
    """A fleet whose beat, too, is started again when it exits, as a supervisor does
    (beat exits on a lost connection to the Redis its schedule is in, RedBeat's)."""

    def restart_dead(self) -> None:
        self.restart_dead_workers()
        beats = [proc for proc, log in self.procs if log.name.startswith("beat-")]
        if beats and all(proc.poll() is not None for proc in beats):
            self.beat()


@contextmanager
def running(cluster, broker: str, tmp_path: Path) -> Iterator[tuple[Supervised, Producer]]:
    """A supervised worker (2 processes) and beat on ``cluster``, flushing to
    ``tmp_path/lake``, and a producer appending with one replica; both stopped after."""
    env = cluster_fleet_env(cluster, broker, tmp_path / "lake", DELTAFLUSH_LEASE_S="3",
                            DELTAFLUSH_MAX_FILE_BYTES="32768", DELTAFLUSH_APPEND_REPLICAS="1",
                            DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS="2000")
    with own_fleet(env, tmp_path, Supervised) as fleet:
        producer = Producer(settings=Settings.from_env(env))
        try:
            fleet.worker(concurrency=2)
            fleet.beat()
            yield fleet, producer
        finally:
            producer.close()


def check_landed(fleet: Supervised, client: redis.Redis, storage: Path,
                 appender: Appender, fault: str) -> None:
    def drained() -> bool:
        fleet.restart_dead()
        try:
            return all(client.xlen(wire.Keys("deltaflush", t).delta) == 0
                       and landed(client, t, 0) for t in appender.tables)
        except redis.RedisError:
            return False
    wait_for(drained, 240, f"every table to drain; logs:\n{fleet.logs()}", interval=0.5)
    # every acknowledged row once, an append whose outcome is unknown at most once; the
    # tables' ids told apart by an offset, so the fault is checked (and recorded) once
    ids: list[int] = []
    acked: set[int] = set()
    maybe: set[int] = set()
    for n, table in enumerate(appender.tables):
        offset = n * 10_000_000
        ids += [offset + i for i in read_ids(storage, table)]
        acked |= {offset + s + j for s in appender.acked[table] for j in range(BATCH_ROWS)}
        maybe |= {offset + s + j for s in appender.unknown[table] for j in range(BATCH_ROWS)}
    check_ids(f"cluster: {fault}", ids, acked | maybe, acked,
              lambda missing: f"{len(missing)} acknowledged rows lost")


@pytest.mark.timeout(420)
def test_a_master_killed_mid_run_while_its_replica_is_promoted(own_cluster, rabbitmq_vhost,
                                                               tmp_path):
    cluster = own_cluster
    storage = tmp_path / "lake"
    with running(cluster, rabbitmq_vhost, tmp_path) as (fleet, producer):
        appender = Appender(producer, 60)
        appender.start()
        wait_for(lambda: appender.done >= 15, 120, "a third of the appends")
        victim = cluster.master_of(wire.Keys("deltaflush", "t0").delta)
        replica = cluster.replica_of(victim)
        cluster.kill(victim)  # SIGKILL, mid-run
        cluster.wait_promoted(replica)  # elected by the others (no takeover)
        cluster.restart(victim)  # back as the new master's replica: appends can wait again
        cluster.wait_healthy()
        appender.join(300)
        assert not appender.is_alive()
        assert appender.done == 60
        check_landed(fleet, producer.redis, storage, appender,
                     "a master SIGKILLed mid-run, its replica elected (append replicas 1)")
        # the appends to the failed master's tables went on, and at most a few were unknown
        assert sum(len(v) for v in appender.acked.values()) >= 60 * len(TABLES) - 10, \
            appender.errors[:3]


@pytest.mark.timeout(420)
def test_a_slot_migrated_while_appends_and_flushes_go_on(own_cluster, rabbitmq_vhost,
                                                         tmp_path, caplog):
    cluster = own_cluster
    storage = tmp_path / "lake"
    with running(cluster, rabbitmq_vhost, tmp_path) as (fleet, producer):
        appender = Appender(producer, 60)
        appender.start()
        wait_for(lambda: appender.done >= 10, 120, "a sixth of the appends")
        keys = wire.Keys("deltaflush", "t0")
        source = cluster.master_of(keys.delta)
        target = next(m for m in cluster.masters() if m.port != source.port)
        caplog.set_level(logging.INFO, logger="producer.cluster")
        moved = cluster.migrate_slot(key_slot(keys.delta.encode()), target, pause_s=0.2)
        assert moved >= 5  # the table's stream, schema, counters...
        assert cluster.master_of(keys.delta).port == target.port
        appender.join(300)
        assert not appender.is_alive()
        assert appender.done == 60
        check_landed(fleet, producer.redis, storage, appender,
                     "a table's slot migrated key by key under appends and flushes")
        assert not any(appender.unknown.values()), appender.errors[:3]
        # the producer met the slot half moved (ASK/TRYAGAIN) or moved (MOVED), and went on
        assert any("is moving or failing over" in r.getMessage() and "{t0}" in r.getMessage()
                   for r in caplog.records)


#: How many slots the reshard test moves: the first ones of the source, in ascending order.
RESHARD_SLOTS = 16


def table_in_first_slots(cluster, source, count: int) -> str:
    """A table name whose keys' slot is among the ``count`` lowest slots of ``source``: the
    ones ``redis-cli --cluster reshard --cluster-slots count`` takes from it."""
    first = set(cluster.slots_of(source)[:count])
    return next(name for name in (f"hot{i}" for i in range(1_000_000))
                if key_slot(wire.Keys("deltaflush", name).delta.encode()) in first)


@pytest.mark.timeout(420)
def test_slots_resharded_with_redis_cli_while_appends_and_flushes_go_on(
        own_cluster, rabbitmq_vhost, tmp_path, caplog):
    cluster = own_cluster
    storage = tmp_path / "lake"
    source, target = cluster.masters()[:2]
    hot = table_in_first_slots(cluster, source, RESHARD_SLOTS)
    keys = wire.Keys("deltaflush", hot)
    slot = key_slot(keys.delta.encode())
    with running(cluster, rabbitmq_vhost, tmp_path) as (fleet, producer):
        appender = Appender(producer, 10_000, tables=[hot, *TABLES[:3]])
        appender.start()
        caplog.set_level(logging.INFO, logger="producer.cluster")
        # appends and flushes are going on: rows of the hot table are published already
        wait_for(lambda: appender.done >= 5 and read_ids(storage, hot), 120,
                 f"the first flushes of {hot}; logs:\n{fleet.logs()}", interval=0.2)
        before = cluster.slots_of(source)
        out = cluster.reshard(source, target, RESHARD_SLOTS)
        during = appender.done
        moved = set(before) - set(cluster.slots_of(source))
        assert len(moved) == RESHARD_SLOTS, out
        assert slot in moved, (slot, sorted(moved))
        assert moved <= set(cluster.slots_of(target))
        assert cluster.master_of_slot(slot).port == target.port  # CLUSTER SLOTS says so
        assert f"Moving slot {slot} from {source.address}" in out
        # the appender goes on against the new owner, then stops
        wait_for(lambda: appender.done >= during + 5 or not appender.is_alive(), 180,
                 "appends after the reshard")
        appender.stop.set()
        appender.join(120)
        assert not appender.is_alive()
        assert appender.done >= during + 5, appender.errors[:3]
        check_landed(fleet, producer.redis, storage, appender,
                     "slots resharded with redis-cli --cluster reshard under appends and "
                     "flushes")
        assert not any(appender.unknown.values()), appender.errors[:3]
        # the producer met the moved slot (MOVED, or ASK/TRYAGAIN mid-move) and went on
        assert any("is moving or failing over" in r.getMessage()
                   and f"{{{hot}}}" in r.getMessage() for r in caplog.records)
