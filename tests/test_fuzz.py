"""Fuzzing the decoding path: random and mutated payloads never crash a flush or a file."""

import fakeredis
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import Producer, Settings, wire
from tests.conftest import id_batch, read_ids
from tests.reliability import record
from workers.flusher import Flusher
from workers.sources.reading import decode
from workers.storage import Storage

GOOD = id_batch(0, 20)
PAYLOAD = wire.encode_batches(GOOD.schema, GOOD.to_batches())
NESTED = pa.table({"l": pa.array([[1, 2], None, [3]]),
                   "s": pa.array([{"a": 1, "b": "x"}, None, {"a": 2, "b": None}]),
                   "d": pa.array(["a", "b", "a"]).dictionary_encode()})
NESTED_PAYLOAD = wire.encode_batches(NESTED.schema, NESTED.to_batches())


@st.composite
def mutated(draw, base=PAYLOAD):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


def check(payload: bytes) -> None:
    for schema in (None, GOOD.schema):
        try:
            table = decode(payload, schema, "events")
        except ValueError:
            continue
        table.validate(full=True)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_value_error_ordecode(payload):
    check(payload)


@settings(max_examples=600, deadline=None)
@given(mutated())
def test_mutated_payloads_raise_value_error_or_decode_valid_data(payload):
    check(payload)


@settings(max_examples=300, deadline=None)
@given(mutated(NESTED_PAYLOAD))
def test_mutated_nested_payloads(payload):
    check(payload)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=5))
def test_a_flush_through_garbage_keeps_every_good_row(tmp_path_factory, garbage):
    client = fakeredis.FakeRedis()
    root = tmp_path_factory.mktemp("lake")
    p = Producer(client=client, settings=Settings())
    k = wire.Keys("deltaflush", "events")
    p.append("events", id_batch(0, 10))
    for g in garbage:
        client.xadd(k.delta, {"arrow": g})
    p.append("events", id_batch(10, 10))
    result = Flusher(client, Storage(str(root)), Settings()).flush("events")
    assert client.xlen(k.delta) == 0
    decodable = 0
    for g in garbage:
        try:
            decode(g, GOOD.schema, "events")
            decodable += 1
        except ValueError:
            pass
    assert result.dead == len(garbage) - decodable  # each entry is in a file or dead
    assert client.xlen(k.dead) == result.dead
    ids = read_ids(root, "events")
    assert len(ids) == result.rows
    record("fuzzed (mutated) payloads between good entries", "tests/test_fuzz.py::"
           "test_a_flush_through_garbage_keeps_every_good_row", 20,
           len(set(range(20)) - set(ids)), 0)
    assert set(range(20)) <= set(ids)  # every good row, whatever the garbage between
