"""The producer API: what it accepts, what it refuses, and that a refusal writes nothing."""

import pandas as pd
import pyarrow as pa
import pytest
import redis

import producer.client as client_module
from producer import (
    InvalidInput,
    InvalidTableName,
    Producer,
    SchemaConflict,
    Settings,
    UnsupportedData,
    wire,
)
from producer.errors import Backpressure
from tests.conftest import RedisServer, id_batch
from tests.reliability import refused

K = wire.Keys("deltaflush", "events")


@pytest.fixture
def p(any_redis):
    return Producer(settings=Settings(), client=any_redis)


def entries(client, keys=K):
    return [wire.decode_payload(f[b"arrow"]) for _, f in client.xrange(keys.delta)]


@pytest.mark.parametrize("data", [
    id_batch(0, 3),
    id_batch(0, 3).to_batches()[0],
    id_batch(0, 3).to_pandas(),
    id_batch(0, 3).to_pylist(),
], ids=["table", "record_batch", "pandas", "list_of_dicts"])
def test_append_accepts_every_supported_type(p, data):
    entry_id = p.append("events", data)
    assert wire.parse_id(entry_id)[0] > 0
    (table,) = entries(p.redis)
    assert table.column("id").to_pylist() == [0, 1, 2]
    assert p.redis.sismember(wire.tables_key("deltaflush"), "events")
    assert p.redis.hget(K.pending, "rows") == b"3"


def test_append_many_pipelines_and_keeps_order(p):
    ids = p.append_many("events", [id_batch(i * 10, 10) for i in range(5)])
    assert len(ids) == 5 and ids == sorted(ids, key=wire.parse_id)
    got = [t.column("id")[0].as_py() for t in entries(p.redis)]
    assert got == [0, 10, 20, 30, 40]


def test_append_many_in_several_send_groups_keeps_order_and_retries_the_refused(
        any_redis, monkeypatch):
    """Groups are encoded while the previous one is sent; a batch refused in the middle
    (here: the table's schema evolved meanwhile) is conformed and sent again, after."""
    monkeypatch.setattr(client_module, "SEND_GROUP_BYTES", 1)  # one batch per group
    p = Producer(settings=Settings(), client=any_redis)
    p.append("events", id_batch(0, 1))
    other = Producer(settings=Settings(), client=any_redis)
    other.append("events", id_batch(1, 1).append_column("extra", pa.array([1], pa.int64())))
    ids = p.append_many("events", [id_batch(i * 10, 10) for i in range(1, 6)])
    assert len(ids) == 5 and len(set(ids)) == 5
    got = sorted(t.column("id")[0].as_py() for t in entries(any_redis))
    assert got == [0, 1, 10, 20, 30, 40, 50]
    assert int(any_redis.hget(K.pending, "rows")) == 52
    stored = [e[0].decode() for e in any_redis.xrange(K.delta)]
    assert set(ids) <= set(stored) and len(stored) == 7


def test_pandas_index_and_metadata_are_not_part_of_the_schema(p):
    df = pd.DataFrame({"id": [1, 2]}, index=[10, 11])
    p.append("events", df)
    stored = wire.schema_from_canonical(p.redis.get(K.schema))
    assert stored.names == ["id"] and not stored.metadata


@pytest.mark.parametrize("name", ["bad-name", "1st", "", "x" * 129, "a b", None, "_events",
                                  "_deltaflush_tmp"])
def test_invalid_table_name_is_refused_before_anything_is_written(p, name):
    with pytest.raises(InvalidTableName) as err:
        p.append(name, id_batch(0, 1))
    assert isinstance(err.value, ValueError)
    assert "letters, digits and '_'" in str(err.value)
    refused("invalid table name", 1, len(p.redis.keys("*")))


@pytest.mark.parametrize("data,match", [
    ("a string", "not str"),
    (42, "not int"),
    ([1, 2], "must hold dicts"),
    ([], "empty"),
    (pa.table({"a": pa.array([], pa.int64())}), "empty"),
    ([{"a": 1}, {"a": "x"}], "cannot convert"),
    (pa.table([pa.array([1]), pa.array([2])], names=["a", "a"]), "two or more columns named"),
    (pa.table({"s": pa.array([{"x": 1, "y": 2}])}).cast(pa.schema([("s", pa.struct(
        [("x", pa.int64()), ("x", pa.int64())]))])), "struct 's' has two or more"),
])
def test_unsupported_data_is_refused_with_a_clear_message(p, data, match):
    with pytest.raises(UnsupportedData, match=match):
        p.append("events", data)
    refused("unsupported or empty data", 1, len(p.redis.keys("*")))


def test_schema_conflict_names_the_column_and_both_types_and_writes_nothing(p):
    p.append("events", id_batch(0, 2))
    bad = id_batch(2, 2).set_column(0, "id", pa.array(["2", "3"]))
    with pytest.raises(SchemaConflict) as err:
        p.append("events", bad)
    e = err.value
    assert isinstance(e, ValueError) and isinstance(e, InvalidInput)
    assert (e.column, e.table_type, e.batch_type) == ("id", "int64", "string")
    assert "'id'" in str(e) and "int64" in str(e) and "string" in str(e)
    refused("schema conflict", 2, p.redis.xlen(K.delta) - 1)


def test_schema_conflict_is_detected_by_redis_for_a_fresh_producer(any_redis):
    Producer(client=any_redis, settings=Settings()).append("events", id_batch(0, 2))
    other = Producer(client=any_redis, settings=Settings())  # knows nothing of the schema
    with pytest.raises(SchemaConflict, match="'value'"):
        other.append("events", id_batch(2, 2).set_column(3, "value", pa.array([1, 2])))
    assert any_redis.xlen(K.delta) == 1


def test_missing_non_nullable_column_is_a_conflict(p):
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), ("v", pa.int64())])
    p.append("events", pa.table({"id": [1], "v": [2]}, schema=schema))
    with pytest.raises(SchemaConflict, match="'id'.*lacks it"):
        p.append("events", pa.table({"v": [3]}))


def test_reordered_columns_and_all_null_columns_are_conformed(p):
    p.append("events", id_batch(0, 2))
    t = id_batch(2, 2)
    reordered = t.select(["value", "name", "ts", "id"])
    p.append("events", reordered)
    p.append("events", [{"id": 4, "ts": None, "name": None, "value": None}])
    schemas = {e.schema for e in entries(p.redis)}
    assert len(schemas) == 1


def test_pending_counters_sum_rows_and_bytes(p):
    p.append("events", id_batch(0, 7))
    p.append_many("events", [id_batch(7, 3), id_batch(10, 5)])
    assert int(p.redis.hget(K.pending, "rows")) == 15
    total = sum(len(f[b"arrow"]) for _, f in p.redis.xrange(K.delta))
    assert int(p.redis.hget(K.pending, "bytes")) == total


def test_key_prefix_is_honoured(any_redis):
    p = Producer(client=any_redis, settings=Settings(key_prefix="acme"))
    p.append("events", id_batch(0, 1))
    assert any_redis.xlen("acme:{events}:delta") == 1
    assert any_redis.sismember("acme:tables", "events")


def test_flush_enqueues_one_json_task_naming_the_table(real_redis, redis_server):
    import json

    p = Producer(redis_url=redis_server.url)
    assert p.flush("events") is True
    assert p.flush("events") is False  # one is already queued
    (raw,) = real_redis.lrange(wire.QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "flush_table"
    assert message["content-type"] == "application/json"
    import base64
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == ["events"]
    p.close()


def test_flush_refuses_bad_table_names(p):
    with pytest.raises(InvalidTableName):
        p.flush("no such!")


def test_append_when_redis_is_out_of_memory_leaves_no_unchecked_entry(tmp_path):
    """The XADD and its check are one transaction: when Redis refuses it for lack of memory
    the append raises, and every entry in the stream is one the producer was told about,
    counted in the pending counters."""
    server = RedisServer(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    server.start()
    client = redis.Redis.from_url(server.url)
    producer = Producer(client=client, settings=Settings(max_pending_bytes=0))
    try:
        accepted = []
        with pytest.raises(redis.ResponseError, match="OOM|maxmemory"):
            for i in range(2000):
                accepted.append(producer.append("events", id_batch(i * 1000, 1000)))
        assert accepted, "Redis refused the very first batch: raise maxmemory"
        assert [e[0].decode() for e in client.xrange(K.delta)] == accepted
        assert int(client.hget(K.pending, "rows")) == 1000 * len(accepted)
    finally:
        client.close()
        server.stop()


#: docs/spec.md, Permissions: what the protocol needs, and what the client library sends.
PRODUCER_ACL = ["+sadd", "+get", "+multi", "+exec", "+xadd", "+eval", "+set", "+hget",
                "+hincrby", "+xlen", "+xdel", "+xgroup|setid", "+xgroup|create",
                "+xinfo|groups", "+xrevrange", "+hset"]


def _idle(p: Producer) -> None:
    """As if every connection of ``p`` had been idle for the health-check interval."""
    for conn in p.redis.connection_pool._available_connections:
        conn.next_health_check = 0


def test_a_producer_needs_only_the_documented_acl(redis_server, real_redis):
    """docs/spec.md (Permissions) lists what a producer's Redis user needs; a user with
    exactly that appends, evolves the schema, is deduplicated, meets backpressure and
    requests a flush; +ping for the client's health check of an idle connection."""
    real_redis.acl_setuser(
        "appender", enabled=True, passwords=["+s3cret"], keys=["deltaflush:*"],
        commands=[*PRODUCER_ACL, "+ping"])
    try:
        url = redis_server.url.replace("redis://", "redis://appender:s3cret@")
        p = Producer(settings=Settings(redis_url=url, max_pending_bytes=0))
        p.append("events", id_batch(0, 10))
        p.append_many("events", [id_batch(10, 10), id_batch(20, 10).append_column(
            "extra", pa.array([1] * 10, pa.int64()))])
        keys = p._keys("events")
        [item] = p._encode([p._shape(keys, p._prepare("events", id_batch(30, 10)))])
        assert p._accepted(keys, item, p._transaction(keys, [item])[0]) == \
            p._accepted(keys, item, p._transaction(keys, [item])[0])
        assert real_redis.xlen(K.delta) == 4
        _idle(p)  # redis-py PINGs a connection idle for 30 s before it uses it again
        p.request_flush("events")
        assert real_redis.hexists(K.sched, "flush_requested")
        p.close()
        tight = Producer(settings=Settings(redis_url=url, max_pending_bytes=1))
        with pytest.raises(Backpressure):
            tight.append("events", id_batch(40, 10))
        tight.close()
        assert real_redis.xlen(K.delta) == 4
    finally:
        real_redis.acl_deluser("appender")


def test_what_the_client_library_sends_needs_permissions_too(redis_server, real_redis):
    """docs/spec.md, Permissions: without +ping an append after 30 s of idle connection
    fails (the health check's PING is refused); a database other than 0 needs +select."""
    real_redis.acl_setuser("bare", enabled=True, passwords=["+s3cret"], keys=["deltaflush:*"],
                           commands=PRODUCER_ACL)
    real_redis.acl_setuser("db1", enabled=True, passwords=["+s3cret"], keys=["deltaflush:*"],
                           commands=[*PRODUCER_ACL, "+ping", "+select"])
    url = redis_server.url.replace("redis://", "redis://{}:s3cret@")
    db1 = redis.Redis.from_url(redis_server.url[:-1] + "1")
    try:
        p = Producer(settings=Settings(redis_url=url.format("bare")))
        p.append("events", id_batch(0, 1))
        _idle(p)
        with pytest.raises(redis.exceptions.NoPermissionError, match="'ping'"):
            p.append("events", id_batch(1, 1))
        p.close()
        with pytest.raises(redis.exceptions.NoPermissionError, match="'select'"):
            Producer(settings=Settings(redis_url=url.format("bare")[:-1] + "1")).append(
                "events", id_batch(1, 1))
        p = Producer(settings=Settings(redis_url=url.format("db1")[:-1] + "1"))
        p.append("events", id_batch(1, 1))
        _idle(p)
        p.append("events", id_batch(2, 1))
        p.close()
        assert real_redis.xlen(K.delta) == 1
        assert db1.xlen(K.delta) == 2
    finally:
        real_redis.acl_deluser("bare", "db1")
        db1.flushdb()
        db1.close()
