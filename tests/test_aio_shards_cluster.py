"""``AsyncProducer`` on sharded tables on a real 6-node Redis Cluster (tests/cluster.py):
its shards on several masters, each append and the schema authority's compare-and-set on
the master of their slot (redis-py's asyncio cluster client), every row flushed exactly once
and each key's rows in order within their shard (DuckDB); and with
``DELTAFLUSH_APPEND_REPLICAS``, the authority's replica waited for before a shard evolves."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from producer import AsyncProducer, shards, wire
from producer.client import connect
from producer.errors import ReplicationTimeout, SchemaConflict
from tests.test_cluster import BROKER, settings_for
from tests.test_shards_cluster import drained
from tests.test_shards_fleet import batch, read_back
from workers.flusher import Flusher
from workers.storage import Storage

TABLE = "events"


def test_async_shards_on_several_masters_flush_exactly_once(redis_cluster, cluster_prefix,
                                                            storage_dir):
    settings = settings_for(redis_cluster, cluster_prefix, storage_dir, broker_url=BROKER)

    async def main() -> int:
        async with AsyncProducer(settings=settings) as ap:
            await ap.configure(TABLE, shards=4, shard_key="user")
            total = 0
            for _ in range(6):
                await ap.append(TABLE, batch(total, 130))
                total += 130
            await ap.append_many(TABLE, [batch(total, 130), batch(total + 130, 130)])
            total += 260
            # an evolution through shards i >= 1 moves the authority first (another slot)
            await ap.append(TABLE, batch(total, 130).append_column("extra",
                                                                   pa.array([1] * 130)))
            total += 130
            with pytest.raises(SchemaConflict, match="extra"):
                await ap.append(TABLE, batch(total, 10).append_column("extra",
                                                                      pa.array(["x"] * 10)))
            async with ap.batcher(linger_ms=5, max_rows=400) as b:
                futures = [b.write(TABLE, row) for row in batch(total, 1200).to_pylist()]
            assert all(f.result() for f in futures)
            return total + 1200

    total = asyncio.run(main())
    client = connect(settings.redis_url)
    keys = shards.table_shards(client, cluster_prefix, TABLE)
    assert len({redis_cluster.master_of(k.delta).port for k in keys}) >= 2
    assert Flusher(client, Storage(str(storage_dir)), settings).flush_shards(TABLE).rows == total
    assert drained(client, cluster_prefix, total)
    read_back(storage_dir, total, "Redis Cluster: AsyncProducer, 4 shards on several masters")
    client.close()


def test_an_async_replicated_evolution_waits_for_the_authoritys_replica(redis_cluster,
                                                                       cluster_prefix):
    """``Producer``'s test_a_replicated_evolution_reaches_the_authoritys_replica_first, on
    ``AsyncProducer``: a paused replica of shard 0's master makes the evolution a
    ReplicationTimeout, nothing of the batch appended; a retry with its batch ID lands it
    once."""
    settings = settings_for(redis_cluster, cluster_prefix, append_replicas=1,
                            append_replicas_timeout_ms=2000)
    authority = wire.Keys(cluster_prefix, TABLE).authority
    replica = redis_cluster.replica_of(redis_cluster.master_of(authority))
    # a batch ID whose shard is not 0, so the evolution goes through the authority
    bid = next(f"{i:032d}" for i in range(100) if shards.shard_of(f"{i:032d}", 4))
    evolving = pa.table({"id": [1], "extra": ["x"]})
    client = connect(settings.redis_url)
    keys = [wire.Keys(cluster_prefix, TABLE, i) for i in range(4)]

    async def main() -> None:
        async with AsyncProducer(settings=settings) as ap:
            await ap.configure(TABLE, shards=4)
            await ap.append(TABLE, pa.table({"id": [0]}), batch_id="a" * 32)
            redis_cluster.pause(replica)
            try:
                with pytest.raises(ReplicationTimeout, match="schema evolved"):
                    await ap.append(TABLE, evolving, batch_id=bid)
            finally:
                redis_cluster.resume(replica)
            assert sum(client.xlen(k.delta) for k in keys) == 1
            assert (await ap.append(TABLE, evolving, batch_id=bid)).startswith(
                f"{shards.shard_of(bid, 4)}:")

    asyncio.run(main())
    with replica.client(readonly=True) as r:
        assert b"extra" in r.get(authority)
    assert sum(client.xlen(k.delta) for k in keys) == 2
    client.close()
