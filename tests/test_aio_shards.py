"""``AsyncProducer`` on sharded tables (protocol 2, docs/shards.md), against a real
redis-server: its appends, ``append_many`` and batcher routed as ``Producer``'s (round-robin,
or split by the shard key), batch-ID retries to the shard that remembers them, the schema
authority across shards; and with real Celery workers flushing, every row exactly once and
each key's rows in order within its shard (read back by DuckDB)."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from producer import AsyncProducer, Producer, Settings, shards, wire
from producer.errors import ConfigError, SchemaConflict, UnsupportedData
from tests.test_shards import flush_all, keyed_batch, read
from tests.test_shards_fleet import batch, read_back, wait_drained
from workers.flusher import Flusher
from workers.storage import Storage

TABLE = "events"
#: an entry ID of a sharded table: ``<shard>:<ms>-<seq>``, one per shard a batch went to
SHARD_IDS = re.compile(r"^\d+:\d+-\d+( \d+:\d+-\d+)*$")


def delta_lengths(client) -> list[int]:
    return [client.xlen(k.delta) for k in shards.table_shards(client, "deltaflush", TABLE)]


@pytest.mark.parametrize("key", ["", "user"])
def test_async_appends_go_to_the_shards_as_the_blocking_producers_do(redis_server, real_redis,
                                                                     storage_dir, key):
    Producer(client=real_redis, settings=Settings.from_env({})).configure(
        TABLE, shards=3, shard_key=key)

    async def main() -> list[str]:
        async with AsyncProducer(settings=Settings(redis_url=redis_server.url)) as ap:
            ids = [await ap.append(TABLE, keyed_batch(i * 35, 35)) for i in range(6)]
            ids += await ap.append_many(TABLE, [keyed_batch(210 + i * 35, 35)
                                                for i in range(6)])
            # a retry with the batch ID reaches the shard(s) that remember it
            retried = await ap.append(TABLE, keyed_batch(420, 35), batch_id="r" * 32)
            assert await ap.append(TABLE, keyed_batch(420, 35), batch_id="r" * 32) == retried
            with pytest.raises(UnsupportedData, match="sharded by column 'user'") if key \
                    else contextlib.nullcontext():
                await ap.append(TABLE, pa.table({"id": [10_000]}))
            return [*ids, retried]

    ids = asyncio.run(main())
    assert all(SHARD_IDS.match(i) for i in ids), ids
    lengths = delta_lengths(real_redis)
    if key:  # 7 users over 3 shards: each batch split over the shards its users hash to
        assert len(ids[0].split()) == len({shards.shard_of(f"u{u}", 3) for u in range(7)})
        entries = 13 * len(ids[0].split())
    else:  # round-robin: 12 batches, 4 a shard, the retried one (and the unkeyed one) alone
        assert sorted(lengths) in ([4, 5, 5], [4, 4, 6])
        entries = 14
    assert sum(lengths) == entries
    flush_all(real_redis, storage_dir)
    table = read(storage_dir)
    assert sorted(table["id"].to_pylist()) == list(range(455)) + ([] if key else [10_000])
    for f in (storage_dir / TABLE).glob("*.parquet"):
        stream = pq.read_metadata(f).metadata[b"deltaflush.stream"].decode()
        rows = [r for r in pq.read_table(f).to_pylist() if r["user"] is not None]
        for user in {r["user"] for r in rows} if key else ():
            # every row of the user is in this shard's file, in append order
            assert shards.shard_of(user, 3) == wire.shard_of_stream(stream)
            seqs = [r["seq"] for r in rows if r["user"] == user]
            assert seqs == sorted(seqs) == list(range(len(seqs)))


def test_an_async_evolution_on_a_shard_moves_the_authority_first(redis_server, real_redis,
                                                                 storage_dir):
    sync = Producer(client=real_redis, settings=Settings.from_env({}))
    sync.configure(TABLE, shards=2)
    sync.append(TABLE, pa.table({"id": [0]}))
    sync.append(TABLE, pa.table({"id": [1]}))
    k0, k1 = wire.Keys("deltaflush", TABLE), wire.Keys("deltaflush", TABLE, 1)

    async def main() -> None:
        async with AsyncProducer(settings=Settings(redis_url=redis_server.url)) as ap:
            ap._core.next_shard[TABLE] = 1  # its first batch goes to shard 1
            first = await ap.append(TABLE, pa.table({"id": [2], "extra": ["x"]}))
            assert first.startswith("1:")
            # the authority (shard 0's schema) moved before shard 1's copy did
            assert wire.stored_schema(real_redis.get(k0.schema)).names == ["id", "extra"]
            assert wire.stored_schema(real_redis.get(k1.schema)).names == ["id", "extra"]
            # a conflicting type for the column, on either shard: refused, naming it
            for _ in range(2):
                with pytest.raises(SchemaConflict, match="extra"):
                    await ap.append(TABLE, pa.table({"id": [9], "extra": [1.5]}))
            # another producer evolved the table meanwhile: a batch for the other shard
            # is reshaped to the authority's schema (a race, then a resend)
            sync.append(TABLE, pa.table({"id": [3], "extra": ["y"], "more": [1]}))
            for i in range(2):
                await ap.append(TABLE, pa.table({"id": [4 + i], "more": [2]}))

    asyncio.run(main())
    with pytest.raises(SchemaConflict, match="extra"):
        for _ in range(2):
            sync.append(TABLE, pa.table({"id": [9], "extra": [2.5]}))
    flush_all(real_redis, storage_dir)
    table = read(storage_dir).sort_by("id")
    assert table["id"].to_pylist() == [0, 1, 2, 3, 4, 5]
    assert table.schema.names == ["id", "extra", "more"]
    assert table["more"].to_pylist() == [None, None, None, 1, 2, 2]


def test_async_evolutions_racing_across_shards_never_give_two_types(redis_server,
                                                                    real_redis, storage_dir):
    """``test_evolution_racing_across_shards_never_gives_two_types`` with two
    ``AsyncProducer``s on one event loop (their awaits interleave at Redis): each round
    exactly one type of the new column wins in every shard; the other gets SchemaConflict."""
    setup = Producer(client=real_redis, settings=Settings.from_env({}))
    setup.configure(TABLE, shards=2)
    setup.append(TABLE, pa.table({"id": [-1]}))
    setup.append(TABLE, pa.table({"id": [-2]}))
    won: list[str] = []

    async def race(ap: AsyncProducer, shard: int, value: object, round_: int) -> None:
        ap._core.next_shard[TABLE] = shard  # this producer's next batch goes to `shard`
        try:
            await ap.append(TABLE, pa.table({"id": [round_ * 2 + shard],
                                             f"c{round_}": [value]}))
            won.append(f"c{round_}")
        except SchemaConflict:
            pass

    async def main() -> None:
        settings = Settings(redis_url=redis_server.url)
        async with AsyncProducer(settings=settings) as a, \
                AsyncProducer(settings=settings) as b:
            for round_ in range(15):
                await asyncio.gather(race(a, 0, 1, round_), race(b, 1, "one", round_))
                assert won.count(f"c{round_}") == 1, round_

    asyncio.run(main())
    types = {}
    for k in shards.table_shards(real_redis, "deltaflush", TABLE):
        for f in wire.stored_schema(real_redis.get(k.schema)):
            assert types.setdefault(f.name, f.type) == f.type, f"{f.name} in two types"
    flush_all(real_redis, storage_dir)
    assert len(read(storage_dir)) == 2 + 15


def test_an_async_producer_follows_a_shard_count_change_within_the_route_ttl(
        redis_server, real_redis, storage_dir):
    """Another producer changes N 2 -> 4 while this one appends: it re-reads the table's
    configuration within ROUTE_TTL_S (5 s) and spreads over 4 shards from then on; nothing
    lost or duplicated (the flush covers every shard the table ever had)."""
    admin = Producer(client=real_redis, settings=Settings.from_env({}))
    admin.configure(TABLE, shards=2)

    async def main() -> tuple[int, set[int], set[int]]:
        async with AsyncProducer(settings=Settings(redis_url=redis_server.url)) as ap:
            before = {int((await ap.append(TABLE, keyed_batch(i, 1))).split(":")[0])
                      for i in range(8)}
            admin.configure(TABLE, shards=4)
            appended = 8
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while ap._core.shard_count(wire.Keys("deltaflush", TABLE)) != 4:
                assert loop.time() < deadline, "the new shard count was never read"
                await ap.append(TABLE, keyed_batch(appended, 1))
                appended += 1
                await asyncio.sleep(0.05)  # pacing the appends, not a synchronisation
            after = {int((await ap.append(TABLE, keyed_batch(appended + i, 1))).split(":")[0])
                     for i in range(8)}
            return appended + 8, before, after

    total, before, after = asyncio.run(main())
    assert (before, after) == ({0, 1}, {0, 1, 2, 3})
    flush_all(real_redis, storage_dir)
    assert sorted(read(storage_dir)["id"].to_pylist()) == list(range(total))


@pytest.mark.integration
@pytest.mark.parametrize("key", ["", "user"])
def test_the_fleet_lands_async_sharded_appends_and_batcher_writes_exactly_once(
        fleet, fleet_env, producer_for, real_redis, storage_dir, key):
    """Shards=3: async appends, append_many and batcher writes (one row at a time) while two
    real workers and beat flush: every row exactly once (DuckDB), each user's rows in one
    shard in append order (with a shard key), every shard used."""
    producer_for().configure(TABLE, shards=3, shard_key=key)
    fleet.worker()
    fleet.worker()
    fleet.beat()

    async def main() -> int:
        total = 0
        async with AsyncProducer(settings=Settings.from_env(fleet_env)) as ap:
            for _ in range(10):
                await ap.append(TABLE, batch(total, 260))
                total += 260
            await ap.append_many(TABLE, [batch(total + i * 100, 100) for i in range(6)])
            total += 600
            async with ap.batcher(linger_ms=5, max_rows=500) as b:
                futures = [b.write(TABLE, row) for row in batch(total, 3000).to_pylist()]
            ids = [f.result() for f in futures]
            total += 3000
            assert all(SHARD_IDS.match(i) for i in ids)
            # the batcher spread its merged batches over the shards too
            assert {int(part.split(":")[0]) for i in ids for part in i.split()} == {0, 1, 2}
            await ap.flush(TABLE)
        return total

    total = asyncio.run(main())
    wait_drained(fleet, real_redis, total)
    per_shard = read_back(storage_dir, total, f"AsyncProducer, 3 shards, key {key or 'none'}",
                          key_order=bool(key), count=3)
    assert sorted(per_shard) == [0, 1, 2]


def test_async_read_configure_and_replay_dead_are_the_blocking_ones(redis_server, real_redis,
                                                                   storage_dir):
    """``configure`` shards the table (and refuses bad settings clearly); ``read`` sees every
    row once, flushed or not, with columns, filter and ``min_id`` (an ID ``append`` returned);
    ``replay_dead`` sends a shard's dead letter back to that shard."""
    settings = Settings(redis_url=redis_server.url, storage_uri=str(storage_dir))

    async def main() -> None:
        async with AsyncProducer(settings=settings) as ap:
            await ap.append(TABLE, keyed_batch(0, 20))  # unsharded so far
            config = await ap.configure(TABLE, shards=3, shard_key="user")
            assert (config.shards, config.shard_key) == (3, "user")
            assert (await ap.table_config(TABLE)).shards == 3
            with pytest.raises(ConfigError, match="has no column 'nope'"):
                await ap.configure(TABLE, shard_key="nope")
            last = await ap.append(TABLE, keyed_batch(20, 20))  # routed at once
            assert len(last.split()) > 1, last
            reader = await ap.read(TABLE, min_id=last)
            assert sorted(reader.read_all()["id"].to_pylist()) == list(range(40))
            Flusher(real_redis, Storage(str(storage_dir)), settings).flush(TABLE, shard=2)
            more = await ap.append_many(TABLE, [keyed_batch(40, 20)])
            reader = await ap.read(TABLE, columns=["id"], filter=pc.field("user") == "u3",
                                   min_id=more[0])
            table = await asyncio.to_thread(reader.read_all)
            assert table.schema.names == ["id"]
            assert sorted(table["id"].to_pylist()) == [i for i in range(60) if i % 7 == 3]
            # a dead letter of shard 2 goes back to shard 2 (7 users: shards 0 and 2)
            k2 = wire.Keys("deltaflush", TABLE, 2)
            await ap.append(TABLE, keyed_batch(60, 20))
            good = real_redis.xrange(k2.delta)[-1][1]
            real_redis.xadd(k2.dead, {**good, b"error": b"test", b"entry_id": b"1-1"})
            before = real_redis.xlen(k2.delta)
            assert await ap.replay_dead(TABLE) == (1, 0)
            assert real_redis.xlen(k2.dead) == 0 and real_redis.xlen(k2.delta) == before + 1

    asyncio.run(main())
