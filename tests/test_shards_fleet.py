"""Sharded tables flushed by real fleets: ``celery -A workers.app worker`` and ``beat`` in
subprocesses on a real redis-server. Every row is read back by DuckDB, an independent
reader: each exactly once, and the rows of each key in order within their shard."""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from producer import Producer, shards, wire
from tests.conftest import Fleet, wait_for
from tests.reliability import check_ids

pytestmark = pytest.mark.integration

TABLE = "events"
USERS = 13


def batch(start: int, rows: int) -> pa.Table:
    """Rows ``start..start+rows``; ``seq`` numbers each user's rows in append order."""
    ids = list(range(start, start + rows))
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "user": pa.array([f"u{i % USERS}" for i in ids]),
                     "seq": pa.array([i // USERS for i in ids], pa.int64()),
                     "payload": pa.array(["x" * 200] * rows)})


def drained(client, total: int, table: str = TABLE) -> bool:
    """Every shard's delta empty, no flush running or claimed, ``total`` rows counted."""
    keys = shards.table_shards(client, "deltaflush", table)
    return (all(client.xlen(k.delta) == 0 and not client.exists(k.lease, k.claim)
                for k in keys)
            and sum(int(client.hget(k.stats, "rows") or 0) for k in keys) >= total)


def wait_drained(fleet: Fleet, client, total: int, timeout: float = 120) -> None:
    try:
        wait_for(lambda: drained(client, total), timeout, f"{TABLE} to drain")
    except BaseException:
        print(fleet.logs())
        raise


def recount_while_appending(p: Producer, admin: Producer, counts: tuple[int, ...],
                            rows_between: int) -> int:
    """Append batches of 100 rows with ``p`` from a thread while ``admin`` sets the table's
    shard count to each of ``counts`` in turn; after each, wait for ``p`` to use it and for
    ``rows_between`` more rows appended. Return how many rows were appended in all."""
    done = threading.Event()
    appended = [0]

    def produce() -> None:
        while not done.is_set():
            p.append(TABLE, batch(appended[0], 100))
            appended[0] += 100

    producer_thread = threading.Thread(target=produce)
    producer_thread.start()
    try:
        for shards_now in counts:
            admin.configure(TABLE, shards=shards_now)
            # the producer reads the configuration again within ROUTE_TTL_S (5 s)
            wait_for(lambda n=shards_now: p._routes.get(TABLE, (0, 0))[1] == n, 30,
                     f"the producer to use {shards_now} shards")
            start = appended[0]
            wait_for(lambda start=start: appended[0] > start + rows_between, 60, "appends")
    finally:
        done.set()
        producer_thread.join()
    return appended[0]


_NAME = re.compile(r"part-(\d{13})-(\d{6})_\d{13}-\d{6}(?:-s(\d+))?\.parquet$")


def read_back(storage_dir: Path, total: int, fault: str, key_order: bool = True,
              count: int = 4) -> dict[int, int]:
    """Check with DuckDB that ids ``0..total-1`` are there exactly once (recorded for
    docs/reliability.md as ``fault``) and (``key_order``) that each user's rows are in one
    shard of ``count``, in append order; return rows per shard."""
    rows = duckdb.sql(
        f"SELECT id, user, seq, filename FROM read_parquet('{storage_dir / TABLE}/*.parquet', "
        "filename=true)").fetchall()
    check_ids(f"sharded table: {fault}", [r[0] for r in rows], range(total), None,
              lambda missing: f"missing ids: {sorted(missing)[:10]}")
    per_shard: dict[int, list[tuple[tuple[int, int], str, int]]] = defaultdict(list)
    for _id, user, seq, filename in rows:
        match = _NAME.search(filename)
        assert match, filename
        shard = int(match.group(3) or 0)
        per_shard[shard].append(((int(match.group(1)), int(match.group(2))), user, seq))
    if key_order:
        for shard, found in per_shard.items():
            by_user: dict[str, list[int]] = defaultdict(list)
            # files in stream order; rows within a file in their written order
            for _start, user, seq in sorted(found, key=lambda r: r[0]):
                by_user[user].append(seq)
            for user, seqs in by_user.items():
                assert shards.shard_of(user, count) == shard, f"{user} in shard {shard}"
                assert seqs == sorted(seqs), f"{user}'s rows out of order in shard {shard}"
    return {shard: len(found) for shard, found in per_shard.items()}


def test_four_shards_flushed_by_two_workers_at_once(fleet, producer_for, real_redis,
                                                    storage_dir):
    p = producer_for()
    p.configure(TABLE, shards=4, shard_key="user")
    logs = [fleet.worker()[1], fleet.worker()[1]]
    fleet.beat()
    total = 0
    for _ in range(30):
        p.append(TABLE, batch(total, 260))
        total += 260
    wait_drained(fleet, real_redis, total)
    per_shard = read_back(storage_dir, total, "4 shards flushed by 2 workers at once")
    assert sorted(per_shard) == [0, 1, 2, 3]
    for log in logs:  # both workers flushed shards of the table
        assert re.search(rb"flushed table=events", log.read_bytes()), fleet.logs()


def test_sigkill_mid_flush_of_one_shard(fleet, producer_for, real_redis, storage_dir):
    """A worker process SIGKILLed holding one shard's claim: the other shards flush on, the
    killed shard's range is resumed once its lease expires: every row exactly once."""
    p = producer_for()
    p.configure(TABLE, shards=4, shard_key="user")
    total = 0
    for _ in range(20):
        p.append(TABLE, batch(total, 260))
        total += 260
    fleet.worker(failpoints="flush.claimed=kill")
    fleet.beat()
    marker = Path(fleet.env["DELTAFLUSH_FAILPOINT_ONCE_DIR"]) / "flush.claimed"
    wait_for(marker.exists, 60, "a flush of a shard to be killed after its claim")
    fleet.worker()  # a second worker from here on: the other shards flush on meanwhile
    wait_drained(fleet, real_redis, total)
    # the killed worker's main process logs its pool process's death when it notices it
    wait_for(lambda: fleet.logged("SIGKILL"), 30, f"the SIGKILL logged:\n{fleet.logs()}")
    read_back(storage_dir, total, "worker SIGKILLed holding one shard's claim")


def test_changing_the_shard_count_on_a_live_table(fleet, producer_for, real_redis,
                                                  storage_dir):
    """N goes 2 -> 4 -> 1 -> 3 while a producer appends and two workers flush: nothing is
    lost or duplicated (the workers flush every shard the table ever had)."""
    p = producer_for()
    admin = producer_for()
    admin.configure(TABLE, shards=2)
    fleet.worker()
    fleet.worker()
    fleet.beat()
    total = recount_while_appending(p, admin, (4, 1, 3), 3000)
    wait_drained(fleet, real_redis, total)
    per_shard = read_back(storage_dir, total, "shard count changed 2 -> 4 -> 1 -> 3 while "
                          "appending and flushing", key_order=False)
    assert sorted(per_shard) == [0, 1, 2, 3], "every shard that ever was got rows"
    assert shards.shards_ever(real_redis, "deltaflush", TABLE) == 4


def test_a_protocol_1_node_producer_is_refused(real_redis, redis_server, tmp_path):
    """The Node producer speaks protocol 1: a sharded table refuses it (UpgradeRequired),
    instead of letting it write to shard 0 only."""
    from tests.test_foreign_producer import NODE, SCHEMA, Foreign, rows

    if not (NODE / "node_modules").is_dir():
        pytest.skip("clients/node has no node_modules")
    from producer import Producer, Settings

    Producer(client=real_redis, settings=Settings.from_env({})).configure(TABLE, shards=2)
    (tmp_path / "foreign").mkdir()
    node = Foreign("node", ["node", str(NODE / "cli.js")], redis_server.url,
                   tmp_path / "foreign")
    status, out = node.append(TABLE, SCHEMA, rows(0, 3))
    assert (status, out["error"], out["required"]) == (4, "upgrade_required", 2), out
    assert all(real_redis.xlen(k.delta) == 0
               for k in shards.table_shards(real_redis, "deltaflush", TABLE))
    assert wire.PROTOCOL == 2
