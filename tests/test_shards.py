"""Sharded tables (protocol 2, docs/shards.md), in one process: keys, configuration, the
producer's routing (round-robin and by shard key), the schema authority across shards,
protocol-1 producers refused, flushes per shard exactly once, and status per shard. Each
test runs on fakeredis and on a real redis-server; the fleets are in test_shards_fleet.py."""

from __future__ import annotations

import json
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from producer import Producer, Settings, shards, wire
from producer.errors import ConfigError, SchemaConflict, UnsupportedData
from tests.lake import table_ids
from tests.rawcheck import append as raw_append
from workers.flusher import Flusher
from workers.status import table_status
from workers.storage import Storage

TABLE = "events"


def producer(client) -> Producer:
    return Producer(settings=Settings.from_env({}), client=client)


def keyed_batch(start: int, rows: int, users: int = 7) -> pa.Table:
    """Rows ``start..start+rows``; ``user`` cycles over ``users`` keys; ``seq`` is the
    row's position among its user's rows, so per-key order can be checked."""
    ids = list(range(start, start + rows))
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "user": pa.array([f"u{i % users}" for i in ids]),
                     "seq": pa.array([i // users for i in ids], pa.int64())})


def read(root: Path, table: str = TABLE) -> pa.Table:
    return ds.dataset(str(root / table), format="parquet").to_table()


def flush_all(client, storage_dir: Path) -> None:
    Flusher(client, Storage(str(storage_dir)), Settings.from_env({})).flush_shards(TABLE)


def test_shard_keys_carry_the_shard_inside_the_hash_tag():
    assert wire.Keys("deltaflush", "events").delta == "deltaflush:{events}:delta"
    k = wire.Keys("deltaflush", "events", 3)
    assert (k.delta, k.lease, k.dead, k.schema) == (
        "deltaflush:{events~3}:delta", "deltaflush:{events~3}:lease",
        "deltaflush:{events~3}:dead", "deltaflush:{events~3}:schema")
    # the table-level keys are shard 0's
    assert (k.config, k.authority) == ("deltaflush:{events}:config", "deltaflush:{events}:schema")
    assert k.stream == "events~3" and wire.shard_of_stream(k.stream) == 3
    assert wire.Keys("deltaflush", "events", 0) == wire.Keys("deltaflush", "events")


def test_table_shards_lists_every_shard_the_table_ever_had(any_redis):
    p = producer(any_redis)
    assert shards.table_shards(any_redis, "deltaflush", TABLE) == [wire.Keys("deltaflush", TABLE)]
    p.configure(TABLE, shards=4)
    p.configure(TABLE, shards=2)  # fewer: the workers still flush all four
    assert [k.shard for k in shards.table_shards(any_redis, "deltaflush", TABLE)] == [0, 1, 2, 3]
    assert p.table_config(TABLE).shards == 2


def test_the_key_hash_is_crc32_of_canonical_bytes():
    assert shards.shard_of("alice", 4) == zlib.crc32(b"alice") % 4
    assert shards.shard_of(-42, 7) == zlib.crc32(b"-42") % 7
    assert shards.shard_of(None, 5) == 0
    assert shards.shard_of(True, 3) == zlib.crc32(b"true") % 3
    column = pa.chunked_array([["a", None, "b"], ["a", "c"]])
    assert list(shards.row_shards(column, 8)) == [shards.shard_of(v, 8)
                                                 for v in ["a", None, "b", "a", "c"]]
    dictionary = pa.array(["x", "y", "x"]).dictionary_encode()
    assert list(shards.row_shards(dictionary, 8)) == [shards.shard_of(v, 8) for v in "xyx"]


@pytest.mark.parametrize("changes, message", [
    ({"shards": 0}, "shards must be between 1 and 256, got 0"),
    ({"shards": "many"}, "shards='many' is not valid"),
    ({"shards": 4, "shard_key": "nope"}, "has no column 'nope'"),
    ({"shards": 4, "shard_key": "value"}, "a shard key must be an integer, string"),
])
def test_bad_shard_settings_are_refused_clearly(any_redis, changes, message):
    p = producer(any_redis)
    p.append(TABLE, pa.table({"id": [1], "value": [0.5]}))
    with pytest.raises(ConfigError, match=message):
        p.configure(TABLE, **changes)
    assert p.table_config(TABLE).shards == 1
    assert not any_redis.exists(wire.Keys("deltaflush", TABLE).protocol)


def test_a_batch_without_the_shard_key_column_is_refused(any_redis):
    p = producer(any_redis)
    p.configure(TABLE, shards=4, shard_key="user")
    with pytest.raises(UnsupportedData, match="sharded by column 'user'"):
        p.append(TABLE, pa.table({"id": [1]}))
    assert all(any_redis.xlen(k.delta) == 0 for k in shards.table_shards(any_redis, "deltaflush",
                                                                            TABLE))


def test_round_robin_spreads_batches_and_every_row_lands_once(any_redis, storage_dir):
    p = producer(any_redis)
    p.configure(TABLE, shards=4)
    p.append_many(TABLE, [keyed_batch(i * 10, 10) for i in range(40)])
    lengths = [any_redis.xlen(k.delta) for k in shards.table_shards(any_redis, "deltaflush",
                                                                   TABLE)]
    assert lengths == [10, 10, 10, 10]
    flush_all(any_redis, storage_dir)
    ids = sorted(read(storage_dir)["id"].to_pylist())
    assert ids == list(range(400))
    names = sorted(f.name for f in (storage_dir / TABLE).glob("*.parquet"))
    assert sorted(n.rsplit("-", 1)[1] if "-s" in n else "" for n in names) == [
        "", "s1.parquet", "s2.parquet", "s3.parquet"]  # shard 0 keeps the unsharded names
    assert {pq.read_metadata(storage_dir / TABLE / n).metadata[b"deltaflush.stream"]
            for n in names} == {b"events", b"events~1", b"events~2", b"events~3"}


def test_a_shard_key_keeps_each_key_in_one_shard_in_order(any_redis, storage_dir):
    p = producer(any_redis)
    p.configure(TABLE, shards=4, shard_key="user")
    for i in range(20):
        p.append(TABLE, keyed_batch(i * 35, 35))
    flush_all(any_redis, storage_dir)
    table = read(storage_dir)
    assert sorted(table["id"].to_pylist()) == list(range(700))
    for f in (storage_dir / TABLE).glob("*.parquet"):
        stream = pq.read_metadata(f).metadata[b"deltaflush.stream"].decode()
        rows = pq.read_table(f).to_pylist()
        for user in {r["user"] for r in rows}:
            # every row of the user is in this shard's file, in append order
            assert shards.shard_of(user, 4) == wire.shard_of_stream(stream)
            seqs = [r["seq"] for r in rows if r["user"] == user]
            assert seqs == sorted(seqs) == list(range(len(seqs)))


def test_a_protocol_1_producer_is_refused_by_a_sharded_table(any_redis):
    producer(any_redis).configure(TABLE, shards=2)
    schema = wire.canonical_schema(pa.schema([("id", pa.int64())]))
    payload = wire.encode_batches(pa.schema([("id", pa.int64())]),
                                  pa.table({"id": [1]}).to_batches())
    assert raw_append(any_redis, TABLE, payload, 1, schema, protocol=1)[:2] == [4, 2]
    assert raw_append(any_redis, TABLE, payload, 1, schema, protocol=2)[0] == 1
    # an unsharded table, or one configured with shards=1, takes protocol 1 as before
    producer(any_redis).configure("plain", shards=1)
    assert raw_append(any_redis, "plain", payload, 1, schema, protocol=1)[0] == 1


def test_schema_evolution_goes_through_the_authority(any_redis, storage_dir):
    p = producer(any_redis)
    p.configure(TABLE, shards=2)
    p.append(TABLE, pa.table({"id": [0]}))  # shard of the first batch: either
    p.append(TABLE, pa.table({"id": [1]}))
    p.append(TABLE, pa.table({"id": [2], "extra": ["x"]}))  # evolves
    authority = wire.stored_schema(any_redis.get(wire.Keys("deltaflush", TABLE).authority))
    assert authority.names == ["id", "extra"]
    other = producer(any_redis)  # a conflicting evolution from another producer
    with pytest.raises(SchemaConflict, match="extra"):
        for i in range(2):  # both shards
            other.append(TABLE, pa.table({"id": [3 + i], "extra": [1.5]}))
    flush_all(any_redis, storage_dir)
    table = read(storage_dir)
    assert sorted(table["id"].to_pylist()) == [0, 1, 2]


def test_evolution_racing_across_shards_never_gives_two_types(real_redis, storage_dir):
    """Producers on two shards add the same new column with conflicting types at once,
    many times: each time exactly one type wins in every shard, the other producer gets a
    SchemaConflict (nothing of its batch written), and the files read as one table."""
    setup = producer(real_redis)
    setup.configure(TABLE, shards=2)
    setup.append(TABLE, pa.table({"id": [-1]}))
    setup.append(TABLE, pa.table({"id": [-2]}))
    outcomes: dict[str, list[str]] = {"int": [], "str": []}
    for round_ in range(15):
        column = f"c{round_}"
        barrier = threading.Barrier(2)

        def race(kind: str, shard: int, column: str = column, barrier=barrier,
                 round_: int = round_) -> None:
            p = producer(real_redis)
            p._next_shard[TABLE] = shard  # this producer's next batch goes to `shard`
            value = 1 if kind == "int" else "one"
            barrier.wait()
            try:
                p.append(TABLE, pa.table({"id": [round_ * 2 + shard], column: [value]}))
                outcomes[kind].append(column)
            except SchemaConflict:
                pass

        threads = [threading.Thread(target=race, args=("int", 0)),
                   threading.Thread(target=race, args=("str", 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes["int"] + outcomes["str"]).count(column) == 1, column
    types = {}
    for k in shards.table_shards(real_redis, "deltaflush", TABLE):
        schema = wire.stored_schema(real_redis.get(k.schema))
        for f in schema:
            assert types.setdefault(f.name, f.type) == f.type, f"{f.name} in two types"
    flush_all(real_redis, storage_dir)
    table = read(storage_dir)  # one dataset: no column in two types
    assert len(table) == 2 + 15


def test_status_sums_shards_and_lists_each(any_redis, storage_dir):
    p = producer(any_redis)
    p.configure(TABLE, shards=3)
    p.append_many(TABLE, [keyed_batch(i * 10, 10) for i in range(6)])
    [status] = table_status(any_redis, "deltaflush", [TABLE])
    assert (status.pending_rows, status.pending_entries) == (60, 6)
    assert status.shards is not None
    assert [s.pending_rows for s in status.shards] == [20, 20, 20]
    flush_all(any_redis, storage_dir)
    [status] = table_status(any_redis, "deltaflush", [TABLE])
    assert (status.pending_rows, status.rows_flushed, status.files_flushed) == (0, 60, 3)
    assert status.as_dict()["shards"][2]["rows_flushed"] == 20


def test_replayed_dead_letters_go_back_to_their_shard(any_redis, storage_dir):
    p = producer(any_redis)
    p.configure(TABLE, shards=2)
    k1 = wire.Keys("deltaflush", TABLE, 1)
    p.append_many(TABLE, [keyed_batch(0, 5), keyed_batch(5, 5)])
    good = any_redis.xrange(k1.delta)[0][1]
    any_redis.xadd(k1.dead, {**good, b"error": b"test", b"entry_id": b"1-1"})
    assert p.replay_dead(TABLE) == (1, 0)
    assert any_redis.xlen(k1.dead) == 0 and any_redis.xlen(k1.delta) == 2


def test_the_spec_example_of_the_key_hash():
    spec = (Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text()
    assert 'crc32("alice") = 0x278ebc47' in spec
    assert shards.shard_of("alice", 2**32) == 0x278ebc47


@pytest.mark.parametrize("fmt", ["iceberg", "delta"])
def test_a_sharded_lake_table_commits_each_shard_exactly_once(real_redis, storage_dir, fmt):
    """Each shard's ranges are recorded under its own stream (an Iceberg watermark
    property, a Delta app transaction), so equal stream IDs of two shards never make one
    range look committed; a repeated flush commits nothing twice. Read by DuckDB."""
    settings = Settings(max_file_bytes=8_000, table_format=fmt)
    p = Producer(client=real_redis, settings=settings)
    p.configure(TABLE, shards=3, format=fmt)
    p.append_many(TABLE, [keyed_batch(i * 20, 20) for i in range(12)])
    flusher = Flusher(real_redis, Storage(str(storage_dir)), settings)
    assert flusher.flush_shards(TABLE).rows == 240
    sink = flusher.sink_for(p.table_config(TABLE))
    for k in shards.table_shards(real_redis, "deltaflush", TABLE):
        assert sink.last_committed(TABLE, k.stream) is not None, k.stream
    assert flusher.flush_shards(TABLE).rows == 0
    ids = table_ids(storage_dir, TABLE, fmt)
    assert ids == list(range(240))


def test_read_sees_every_shard_once_whatever_is_flushed(real_redis, storage_dir):
    """``p.read`` over a sharded table with some shards flushed, some not: every row once."""
    settings = Settings(storage_uri=str(storage_dir))
    p = Producer(client=real_redis, settings=settings)
    p.configure(TABLE, shards=3, shard_key="user")
    p.append_many(TABLE, [keyed_batch(i * 20, 20) for i in range(6)])
    Flusher(real_redis, Storage(str(storage_dir)), settings).flush(TABLE, shard=1)
    assert sorted(p.read(TABLE).read_all()["id"].to_pylist()) == list(range(120))
    p.append(TABLE, keyed_batch(120, 20))
    Flusher(real_redis, Storage(str(storage_dir)), settings).flush_shards(TABLE)
    assert sorted(p.read(TABLE).read_all()["id"].to_pylist()) == list(range(140))


def test_the_command_line_shards_a_table_and_shows_each_shard(redis_server, real_redis,
                                                              storage_dir):
    from click.testing import CliRunner

    from workers.cli import main

    env = {"DELTAFLUSH_REDIS_URL": redis_server.url, "DELTAFLUSH_STORAGE_URI": str(storage_dir)}

    def run(*args: str):
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    producer(real_redis).append(TABLE, keyed_batch(0, 10))
    bad = run("table", "set", TABLE, "--shards", "4", "--shard-key", "nope")
    assert bad.exit_code == 2 and "has no column 'nope'" in bad.output, bad.output
    assert run("table", "set", TABLE, "--shards", "0").exit_code == 2
    done = run("table", "set", TABLE, "--shards", "4", "--shard-key", "user")
    assert done.exit_code == 0, done.output
    p = producer(real_redis)
    p.append_many(TABLE, [keyed_batch(i * 10, 10) for i in range(1, 8)])
    data = json.loads(run("status", "--json").output)
    [row] = [t for t in data["tables"] if t["table"] == TABLE] if isinstance(data, dict) \
        else [t for t in data if t["table"] == TABLE]
    assert row["pending_rows"] + row["rows_flushed"] == 80
    assert [s["shard"] for s in row["shards"]] == [0, 1, 2, 3]
    assert sum(s["pending_rows"] for s in row["shards"]) == row["pending_rows"]
    flushed = run("flush", TABLE, "--local")
    assert flushed.exit_code == 0, flushed.output
    assert sorted(read(storage_dir)["id"].to_pylist()) == list(range(80))
    assert "events~3" in run("status").output


@pytest.mark.parametrize("values, type_", [
    ([0, -1, 7, None, 2**63 - 1, -2**63, 1234567890123], pa.int64()),
    ([0, 255, None], pa.uint8()),
    ([2**64 - 1, 0], pa.uint64()),
    (["", "é", "alice", None, "x" * 300, "日本"], pa.string()),
    (["a", None, "bc"], pa.large_string()),
    ([b"\x00\xff", None, b""], pa.binary()),
    ([True, False, None], pa.bool_()),
])
def test_the_vectorised_crc_is_zlibs_of_the_canonical_bytes(values, type_):
    column = pa.array(values, type_)
    expected = [zlib.crc32(shards.key_bytes(v)) for v in values]
    assert list(shards.crc32_column(column)) == expected
    assert list(shards.crc32_column(column.slice(1))) == expected[1:]


@pytest.mark.parametrize("key", ["", "user"])
def test_an_append_retried_with_its_batch_id_adds_nothing_twice(any_redis, key):
    """A retry (after a ReplicationTimeout, say) passes the batch ID back: it must reach
    the shards that remember it, so round-robin does not apply to a given batch ID."""
    p = producer(any_redis)
    p.configure(TABLE, shards=4, shard_key=key)
    first = p.append(TABLE, keyed_batch(0, 40), batch_id="b" * 32)
    again = p.append(TABLE, keyed_batch(0, 40), batch_id="b" * 32)
    assert first == again
    assert sum(any_redis.xlen(k.delta) for k in shards.table_shards(
        any_redis, "deltaflush", TABLE)) == (4 if key else 1)


def test_every_shard_writes_its_files_in_the_tables_latest_schema(any_redis, storage_dir):
    """Shard 1's copy still has one column when shard 0 evolves the table: shard 1's file
    has the table's columns all the same (its rows null in the new one)."""
    p = producer(any_redis)
    p.configure(TABLE, shards=2)
    p._next_shard[TABLE] = 1
    p.append(TABLE, pa.table({"id": [1]}))  # shard 1
    p.append(TABLE, pa.table({"id": [2], "extra": ["x"]}))  # shard 0, evolves the table
    k1 = wire.Keys("deltaflush", TABLE, 1)
    assert wire.stored_schema(any_redis.get(k1.schema)).names == ["id"]
    flush_all(any_redis, storage_dir)
    [shard1] = (storage_dir / TABLE).glob("*-s1.parquet")
    assert pq.read_table(shard1).to_pylist() == [{"id": 1, "extra": None}]


def test_the_exporter_reports_tables_summed_and_each_shard(real_redis, storage_dir):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import free_port
    from workers.metrics import serve

    p = producer(real_redis)
    p.configure(TABLE, shards=2)
    p.append_many(TABLE, [keyed_batch(i * 10, 10) for i in range(4)])
    Flusher(real_redis, Storage(str(storage_dir)), Settings.from_env({})).flush(TABLE, shard=1)
    port = free_port()
    server = serve(real_redis, "deltaflush", port, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    m = {(s.name, s.labels.get("shard")): s.value
         for family in text_string_to_metric_families(text) for s in family.samples
         if s.labels.get("table") == TABLE}
    assert m[("deltaflush_pending_rows", None)] == 20
    assert m[("deltaflush_rows_flushed_total", None)] == 20
    assert m[("deltaflush_shard_pending_rows", "0")] == 20
    assert m[("deltaflush_shard_pending_rows", "1")] == 0
    assert m[("deltaflush_shard_rows_flushed_total", "1")] == 20
    assert m[("deltaflush_flush_duration_seconds_count", None)] >= 1


@pytest.mark.parametrize("fmt", ["iceberg", "delta"])
def test_compacting_a_sharded_lake_table_keeps_every_shards_record(real_redis, storage_dir,
                                                                   fmt):
    """A compaction rewrites files of every shard in one commit and keeps each shard's
    record of what it committed; flushes after it still commit each range once."""
    from workers import maintenance

    settings = Settings(max_file_bytes=8_000, table_format=fmt)
    p = Producer(client=real_redis, settings=settings)
    p.configure(TABLE, shards=3, format=fmt)
    flusher = Flusher(real_redis, Storage(str(storage_dir)), settings)
    for i in range(4):
        p.append_many(TABLE, [keyed_batch(i * 60 + j * 20, 20) for j in range(3)])
        flusher.flush_shards(TABLE)
    sink = flusher.sink_for(p.table_config(TABLE))
    streams = [k.stream for k in shards.table_shards(real_redis, "deltaflush", TABLE)]
    before = {s: sink.last_committed(TABLE, s) for s in streams}
    done = maintenance.maintain(real_redis, flusher, TABLE, compact=True)
    compaction = done["compaction"]
    assert compaction.get("compacted", 0) >= 6, done
    assert {s: sink.last_committed(TABLE, s) for s in streams} == before
    p.append_many(TABLE, [keyed_batch(240 + j * 20, 20) for j in range(3)])
    assert flusher.flush_shards(TABLE).rows == 60
    ids = table_ids(storage_dir, TABLE, fmt)
    assert ids == list(range(300))
