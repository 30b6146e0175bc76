"""deltaflush on a real Redis Cluster (tests/cluster.py): cluster mode detected from any
node's URL, every transaction and script in one slot, the fleet's round trips across every
master, replicated appends. Tests share the session's cluster, each under a key prefix of
its own; the failover tests (tests/test_cluster_failover.py) take clusters of their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from redis.cluster import RedisCluster, key_slot

from producer import ConfigError, Producer, ReplicationTimeout, Settings, wire
from producer.admin import dead_letters
from producer.client import connect
from tests.cluster import cluster_fleet_env
from tests.conftest import assert_exactly_once, id_batch, landed, own_fleet, wait_for
from workers.doctor import FAIL, OK, run_checks
from workers.flusher import Flusher
from workers.scheduler import due_tables
from workers.status import table_status
from workers.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
TABLES = [f"t{i}" for i in range(8)]
BROKER = "amqp://guest:guest@127.0.0.1:5672//"  # never reached by the tests that name it


def settings_for(cluster, prefix: str, storage: Path | str = "./data", **more) -> Settings:
    return Settings(redis_url=cluster.url, broker_url=more.pop("broker_url", BROKER),
                    key_prefix=prefix, storage_uri=str(storage), **more)


def duckdb_count(root: Path, table: str) -> tuple[int, int]:
    """Rows and distinct ids of a table, read by DuckDB (an independent reader)."""
    return duckdb.sql(  # type: ignore[return-value]
        f"SELECT count(*), count(DISTINCT id) FROM read_parquet('{root}/{table}/**/*.parquet',"
        " hive_partitioning=true)").fetchone()


def test_a_cluster_url_gives_a_cluster_client_and_needs_a_broker_of_its_own(redis_cluster):
    with pytest.raises(ConfigError, match="names a Redis Cluster, which cannot be the Celery "
                                          "broker.*DELTAFLUSH_BROKER_URL.*RabbitMQ"):
        Producer(redis_url=redis_cluster.url)
    for node in redis_cluster.nodes:  # any node will do, a replica too
        with Producer(redis_url=node.url, broker_url=BROKER) as p:
            assert isinstance(p.redis, RedisCluster)


def test_tables_spread_over_the_masters_append_schedule_flush_and_report(
        redis_cluster, cluster_prefix, storage_dir):
    settings = settings_for(redis_cluster, cluster_prefix, storage_dir)
    p = Producer(settings=settings)
    for n, table in enumerate(TABLES):
        p.append(table, id_batch(0, 100 + n))
        p.append_many(table, [id_batch(100 + n + 50 * i, 50) for i in range(4)])
    masters = {redis_cluster.master_of(wire.Keys(cluster_prefix, t).delta).port
               for t in TABLES}
    assert len(masters) == 3  # the tables live on every master
    # a foreign producer's garbage entry: a dead letter once flushed
    p.redis.xadd(wire.Keys(cluster_prefix, "t0").delta, {b"arrow": b"garbage", b"rows": 1})

    rows = {s.table: s for s in table_status(p.redis, cluster_prefix)}
    assert sorted(rows) == TABLES
    assert all(rows[t].pending_rows == 300 + n for n, t in enumerate(TABLES))
    # one round marks every table across the masters, and no second round does
    assert sorted(due_tables(p.redis, cluster_prefix, 30_000)) == TABLES
    assert due_tables(p.redis, cluster_prefix, 30_000) == []

    flusher = Flusher(p.redis, Storage(str(storage_dir)), settings)
    for table in TABLES:
        assert flusher.flush(table).status == "ok"
    for n, table in enumerate(TABLES):
        assert landed(p.redis, table, 300 + n, cluster_prefix)
        assert_exactly_once(storage_dir, table, 300 + n)
        assert duckdb_count(storage_dir, table) == (300 + n, 300 + n)
    after = {s.table: s for s in table_status(p.redis, cluster_prefix)}
    assert all(after[t].pending_entries == 0 and after[t].rows_flushed == 300 + n
               for n, t in enumerate(TABLES))
    assert after["t0"].dead_entries == 1
    [letter], total = dead_letters(p.redis, wire.Keys(cluster_prefix, "t0"), 10)
    assert total == 1 and letter.size == len(b"garbage") and letter.error
    p.close()


def test_a_scheduling_round_follows_a_slot_that_moved_under_its_client(own_cluster,
                                                                        storage_dir):
    """A round pipelines the due script per master by the client's map of slots; a slot
    moved since (a reshard) answers MOVED there, and the round runs those tables' scripts
    again on their new master instead of failing every round from then on."""
    settings = settings_for(own_cluster, "deltaflush", storage_dir)
    p = Producer(settings=settings)
    for table in TABLES:
        p.append(table, id_batch(0, 10))
    stale = connect(own_cluster.url)  # its map of slots is taken now
    slot = key_slot(wire.Keys("deltaflush", "t0").delta.encode())
    source = own_cluster.master_of_slot(slot)
    target = next(m for m in own_cluster.masters() if m.port != source.port)
    assert own_cluster.migrate_slot(slot, target) >= 1
    assert stale.get_node_from_key(wire.Keys("deltaflush", "t0").delta).port == source.port
    assert sorted(due_tables(stale, "deltaflush", 30_000)) == TABLES
    assert due_tables(stale, "deltaflush", 30_000) == []  # t0 marked on its new master
    p.close()
    stale.close()


def test_the_asyncio_producer_appends_on_every_master_and_waits_for_replicas(
        redis_cluster, cluster_prefix):
    import asyncio

    from producer import AsyncProducer

    settings = settings_for(redis_cluster, cluster_prefix, append_replicas=1,
                            # generous: replicas fsync, on a machine other tests load too
                            append_replicas_timeout_ms=2000)

    async def main() -> tuple[list[str], ReplicationTimeout]:
        async with AsyncProducer(settings=settings) as ap:
            ids = [await ap.append(t, id_batch(0, 10)) for t in TABLES]
            ids += await ap.append_many("t0", [id_batch(10, 5), id_batch(15, 5)])
            async with ap.batcher(linger_ms=1) as b:
                await b.write("t1", {"id": 10, "ts": None, "name": "x", "value": 1.0})
            replica = redis_cluster.replica_of(redis_cluster.master_of(
                wire.Keys(cluster_prefix, "t2").delta))
            redis_cluster.pause(replica)
            try:
                with pytest.raises(ReplicationTimeout) as caught:
                    await ap.append("t2", id_batch(10, 3))
            finally:
                redis_cluster.resume(replica)
            await ap.append("t2", id_batch(10, 3), batch_id=caught.value.batch_ids[0])
            return ids, caught.value

    ids, refused = asyncio.run(main())
    assert len(ids) == len(TABLES) + 2 and refused.acked == 0
    with Producer(settings=settings) as p:
        lengths = {t: p.redis.xlen(wire.Keys(cluster_prefix, t).delta) for t in TABLES}
    assert lengths == {**{t: 1 for t in TABLES}, "t0": 3, "t1": 2, "t2": 2}


def test_configure_read_and_replay_on_the_cluster(redis_cluster, cluster_prefix,
                                                  storage_dir):
    settings = settings_for(redis_cluster, cluster_prefix, storage_dir)
    with Producer(settings=settings) as p:
        p.append("events", id_batch(0, 10))
        config = p.configure("events", partition_by=["name"], flush_interval_s=5)
        assert config.partition_by == ("name",) and p.table_config("events") == config
        Flusher(p.redis, Storage(str(storage_dir)), settings).flush("events")
        p.append("events", id_batch(10, 5))
        both = p.read("events").read_all()  # the flushed rows and the delta's, once each
        assert sorted(both["id"].to_pylist()) == list(range(15))
        keys = wire.Keys(cluster_prefix, "events")
        p.redis.xadd(keys.dead, {b"arrow": bytes(wire.encode_table(id_batch(15, 3))),
                                 b"error": b"was broken", b"entry_id": b"1-0"})
        assert p.replay_dead("events") == (1, 0)
        assert p.redis.xlen(keys.delta) == 2 and p.redis.xlen(keys.dead) == 0


def test_the_command_line_reads_every_master(redis_cluster, cluster_prefix, storage_dir,
                                              tmp_path):
    settings = settings_for(redis_cluster, cluster_prefix, storage_dir)
    with Producer(settings=settings) as p:
        for table in TABLES:
            p.append(table, id_batch(0, 10))
        p.redis.xadd(wire.Keys(cluster_prefix, "t3").delta, {b"arrow": b"junk", b"rows": 1})
        Flusher(p.redis, Storage(str(storage_dir)), settings).flush("t3")
    env = {"DELTAFLUSH_REDIS_URL": redis_cluster.url, "DELTAFLUSH_BROKER_URL": BROKER,
           "DELTAFLUSH_KEY_PREFIX": cluster_prefix, "DELTAFLUSH_STORAGE_URI": str(storage_dir),
           "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)}
    cli = str(Path(sys.executable).with_name("deltaflush"))

    def run(*args: str) -> str:
        proc = subprocess.run([cli, *args], env=env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    status = json.loads(run("status", "--json"))
    by_table = {row["table"]: row for row in status}
    assert sorted(by_table) == TABLES
    assert by_table["t3"]["rows_flushed"] == 10 and by_table["t3"]["dead_entries"] == 1
    assert all(by_table[t]["pending_rows"] == 10 for t in TABLES if t != "t3")
    dead = json.loads(run("dead", "list", "t3", "--json"))
    assert dead["total"] == 1 and dead["dead_letters"][0]["bytes"] == len(b"junk")
    # without a broker of its own, the command that needs one says what to set
    proc = subprocess.run([cli, "flush", "t1"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=dict(env, DELTAFLUSH_BROKER_URL=""))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "DELTAFLUSH_BROKER_URL" in proc.stderr and "RabbitMQ" in proc.stderr


def test_the_exporter_reports_tables_on_every_master(redis_cluster, cluster_prefix):
    from workers.metrics import DeltaflushCollector

    with Producer(settings=settings_for(redis_cluster, cluster_prefix)) as p:
        for n, table in enumerate(TABLES):
            p.append(table, id_batch(0, 10 + n))
        families = {f.name: f for f in DeltaflushCollector(p.redis, cluster_prefix).collect()}
    rows = {s.labels["table"]: s.value for s in families["deltaflush_pending_rows"].samples}
    assert rows == {t: 10 + n for n, t in enumerate(TABLES)}


def test_doctor_checks_every_master(redis_cluster, cluster_prefix, storage_dir):
    found = {c.name: c for c in run_checks(settings_for(
        redis_cluster, cluster_prefix, storage_dir, append_replicas=1))}
    masters = [n.address for n in redis_cluster.masters()]
    for address in masters:
        for check in ("redis eviction", "redis persistence", "redis replicas"):
            assert found[f"{check} {address}"].status == OK, found
    assert "a Redis Cluster of 3 masters" in found["redis"].detail
    too_many = {c.name: c for c in run_checks(settings_for(
        redis_cluster, cluster_prefix, storage_dir, append_replicas=2))}
    assert all(too_many[f"redis replicas {a}"].status == FAIL for a in masters)
    no_broker = {c.name: c for c in run_checks(settings_for(
        redis_cluster, cluster_prefix, storage_dir, broker_url=redis_cluster.url))}
    assert no_broker["broker"].status == FAIL
    assert "DELTAFLUSH_BROKER_URL" in no_broker["broker"].detail


def test_a_replicated_append_waits_for_the_replica_and_a_retry_adds_nothing_twice(
        redis_cluster, cluster_prefix):
    settings = settings_for(redis_cluster, cluster_prefix, append_replicas=1,
                            # generous: replicas fsync, on a machine other tests load too
                            append_replicas_timeout_ms=2000)
    p = Producer(settings=settings)
    keys = wire.Keys(cluster_prefix, "events")
    first = p.append("events", id_batch(0, 10))
    master = redis_cluster.master_of(keys.delta)
    replica = redis_cluster.replica_of(master)
    with replica.client(readonly=True) as r:  # it returned once the replica held it
        assert r.xlen(keys.delta) == 1 and r.xrange(keys.delta)[0][0].decode() == first
    redis_cluster.pause(replica)  # the replica stops acknowledging
    try:
        with pytest.raises(ReplicationTimeout, match="0 of the 1 replicas") as caught:
            p.append("events", id_batch(10, 10))
        assert caught.value.acked == 0 and len(caught.value.batch_ids) == 1
        assert isinstance(caught.value, Exception) and not isinstance(caught.value, ValueError)
    finally:
        redis_cluster.resume(replica)
    # the batch stands on the master; a retry with its batch ID adds nothing twice
    again = p.append("events", id_batch(10, 10), batch_id=caught.value.batch_ids[0])
    assert p.redis.xlen(keys.delta) == 2
    with replica.client(readonly=True) as r:
        assert [e[0].decode() for e in r.xrange(keys.delta)] == [first, again]
    p.close()


@pytest.mark.timeout(300)
def test_a_fleet_on_the_cluster_with_rabbitmq_lands_every_row_once(
        redis_cluster, cluster_prefix, rabbitmq_vhost, storage_dir, tmp_path):
    """Real `celery -A workers.app worker` and beat processes, RabbitMQ as the broker, the
    delta tier on the cluster (RedBeat's schedule too): every row lands exactly once."""
    env = cluster_fleet_env(
        redis_cluster, rabbitmq_vhost, storage_dir, cluster_prefix,
        DELTAFLUSH_APPEND_REPLICAS="1",
        # no size-triggered flushes: beat's rounds (RedBeat on the cluster) queue them
        DELTAFLUSH_FLUSH_AT_BYTES=str(1 << 30))
    with own_fleet(env, tmp_path) as fleet:
        fleet.worker(concurrency=2)
        fleet.beat()
        p = Producer(settings=Settings.from_env(env))
        for round_ in range(5):
            for table in TABLES:
                p.append_many(table, [id_batch(round_ * 400 + i * 100, 100, "y" * 50)
                                      for i in range(4)])
        p.flush("t0")  # a flush asked for through the broker
        wait_for(lambda: all(landed(p.redis, t, 2000, cluster_prefix) for t in TABLES),
                 180, f"every table to land; logs:\n{fleet.logs()}")
        for table in TABLES:
            assert_exactly_once(storage_dir, table, 2000)
            assert duckdb_count(storage_dir, table) == (2000, 2000)
        assert fleet.logged("flushed table=")
        assert fleet.logged("Task deltaflush.schedule_flushes[")
        p.close()
