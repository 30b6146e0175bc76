"""Sharded tables on a real 6-node Redis Cluster (tests/cluster.py): the shards of one table
in slots of several masters, every script and transaction of a shard in its slot, and two
real workers (RabbitMQ broker) flushing a table of 4 shards at once: every row exactly once
by DuckDB, each key's rows in order within its shard."""

from __future__ import annotations

import pyarrow as pa
import pytest

from producer import Producer, Settings, shards, wire
from producer.errors import ReplicationTimeout, SchemaConflict
from tests.cluster import cluster_fleet_env
from tests.conftest import own_fleet, wait_for
from tests.test_cluster import BROKER, settings_for
from tests.test_shards_fleet import batch, read_back, recount_while_appending
from workers.flusher import Flusher
from workers.status import table_status
from workers.storage import Storage

TABLE = "events"


def drained(client, prefix: str, total: int) -> bool:
    keys = shards.table_shards(client, prefix, TABLE)
    return (all(client.xlen(k.delta) == 0 and not client.exists(k.lease)
                and not client.exists(k.claim) for k in keys)
            and sum(int(client.hget(k.stats, "rows") or 0) for k in keys) >= total)


def test_shards_live_on_several_masters_and_flush_exactly_once(redis_cluster, cluster_prefix,
                                                               storage_dir):
    settings = settings_for(redis_cluster, cluster_prefix, storage_dir, broker_url=BROKER)
    p = Producer(settings=settings)
    p.configure(TABLE, shards=4, shard_key="user")
    keys = shards.table_shards(p.redis, cluster_prefix, TABLE)
    masters = {redis_cluster.master_of(k.delta).port for k in keys}
    assert len(masters) >= 2, "the 4 shards all hash to one master"
    total = 0
    for _ in range(8):
        p.append(TABLE, batch(total, 130))
        total += 130
    # an evolution through shard i >= 1 moves the authority first (another slot)
    p.append(TABLE, batch(total, 130).append_column("extra", pa.array([1] * 130)))
    total += 130
    with pytest.raises(SchemaConflict, match="extra"):
        p.append(TABLE, batch(total, 10).append_column("extra", pa.array(["x"] * 10)))
    [status] = table_status(p.redis, cluster_prefix, [TABLE])
    assert status.pending_rows == total and len(status.shards or []) == 4
    result = Flusher(p.redis, Storage(str(storage_dir)), settings).flush_shards(TABLE)
    assert result.rows == total
    assert drained(p.redis, cluster_prefix, total)
    read_back(storage_dir, total, "Redis Cluster: 4 shards on several masters, in process")
    p.close()


@pytest.mark.timeout(300)
def test_two_workers_flush_four_shards_on_the_cluster(redis_cluster, cluster_prefix,
                                                      rabbitmq_vhost, storage_dir, tmp_path):
    env = cluster_fleet_env(redis_cluster, rabbitmq_vhost, storage_dir, cluster_prefix)
    with own_fleet(env, tmp_path) as fleet:
        logs = [fleet.worker()[1], fleet.worker()[1]]
        fleet.beat()
        p = Producer(settings=Settings.from_env(env))
        p.configure(TABLE, shards=4, shard_key="user")
        total = 0
        for _ in range(30):
            p.append(TABLE, batch(total, 260))
            total += 260
        wait_for(lambda: drained(p.redis, cluster_prefix, total), 180,
                 f"every shard to drain; logs:\n{fleet.logs()}")
        per_shard = read_back(storage_dir, total, "Redis Cluster: 4 shards flushed by 2 "
                              "workers (RabbitMQ)")
        assert sorted(per_shard) == [0, 1, 2, 3]
        for log in logs:
            assert b"flushed table=events" in log.read_bytes(), fleet.logs()
        assert wire.PROTOCOL == 2
        p.close()


def test_a_replicated_evolution_reaches_the_authoritys_replica_first(redis_cluster,
                                                                    cluster_prefix):
    """With DELTAFLUSH_APPEND_REPLICAS, the authority's compare-and-set (shard 0's master)
    waits for its replica before the shard's copy moves; a paused replica makes it a
    ReplicationTimeout, nothing of the batch appended, and a retry with the batch's ID
    then lands it once."""
    settings = settings_for(redis_cluster, cluster_prefix, append_replicas=1,
                            append_replicas_timeout_ms=300)
    p = Producer(settings=settings)
    p.configure(TABLE, shards=4)
    p.append(TABLE, pa.table({"id": [0]}), batch_id="a" * 32)
    authority = wire.Keys(cluster_prefix, TABLE).authority
    replica = redis_cluster.replica_of(redis_cluster.master_of(authority))
    # a batch ID whose shard is not 0, so the evolution goes through the authority
    bid = next(f"{i:032d}" for i in range(100) if shards.shard_of(f"{i:032d}", 4))
    evolving = pa.table({"id": [1], "extra": ["x"]})
    redis_cluster.pause(replica)
    try:
        with pytest.raises(ReplicationTimeout, match="schema evolved"):
            p.append(TABLE, evolving, batch_id=bid)
    finally:
        redis_cluster.resume(replica)
    keys = shards.table_shards(p.redis, cluster_prefix, TABLE)
    assert sum(p.redis.xlen(k.delta) for k in keys) == 1
    p.append(TABLE, evolving, batch_id=bid)
    with replica.client(readonly=True) as r:
        assert b"extra" in r.get(authority)
    assert sum(p.redis.xlen(k.delta) for k in keys) == 2
    p.close()


@pytest.mark.timeout(300)
def test_changing_the_shard_count_live_on_the_cluster(redis_cluster, cluster_prefix,
                                                     rabbitmq_vhost, storage_dir, tmp_path):
    """N goes 2 -> 4 -> 1 while a producer appends and two workers flush, on the cluster:
    nothing lost or duplicated."""
    env = cluster_fleet_env(redis_cluster, rabbitmq_vhost, storage_dir, cluster_prefix)
    with own_fleet(env, tmp_path) as fleet:
        fleet.worker()
        fleet.worker()
        fleet.beat()
        p = Producer(settings=Settings.from_env(env))
        admin = Producer(settings=Settings.from_env(env))
        admin.configure(TABLE, shards=2)
        total = recount_while_appending(p, admin, (4, 1), 2000)
        wait_for(lambda: drained(p.redis, cluster_prefix, total), 180,
                 f"every shard to drain; logs:\n{fleet.logs()}")
        per_shard = read_back(storage_dir, total, "Redis Cluster: shard count changed "
                              "2 -> 4 -> 1 while appending and flushing", key_order=False)
        assert sorted(per_shard) == [0, 1, 2, 3]
        p.close()
        admin.close()
