"""The wire contract: key names, IPC round trip, IDs. A change here breaks other producers."""

import pyarrow as pa
import pytest

from producer import wire


def test_key_names_follow_the_contract():
    k = wire.Keys("deltaflush", "events")
    assert wire.tables_key("deltaflush") == "deltaflush:tables"
    assert k.delta == "deltaflush:{events}:delta"
    assert k.dead == "deltaflush:{events}:dead"
    # every per-table key carries the table's hash tag
    for name in ("schema", "pending", "stats", "lease", "fence", "claim", "queued", "sched",
                 "protocol"):
        assert getattr(k, name) == f"deltaflush:{{events}}:{name}"


def test_ipc_stream_round_trip_keeps_batches_and_types():
    schema = pa.schema([("a", pa.int32()), ("b", pa.large_string()),
                        ("t", pa.timestamp("ns", tz="Europe/Paris"))])
    b1 = pa.record_batch([pa.array([1, 2], pa.int32()), pa.array(["x", None], pa.large_string()),
                          pa.array([0, 1], pa.timestamp("ns", tz="Europe/Paris"))], schema=schema)
    payload = wire.encode_batches(schema, [b1, b1])
    # the payload is the Arrow IPC *stream* format any Arrow library can read
    assert pa.ipc.open_stream(payload).schema == schema
    table = wire.decode_payload(payload)
    assert table.schema == schema
    assert table.num_rows == 4


def _payload(table: pa.Table) -> bytes:
    """IPC bytes of ``table`` as they are, however invalid (pyarrow's writer checks nothing)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _strings(offsets: list[int], data: bytes, large: bool = False) -> pa.Array:
    width = pa.int64() if large else pa.int32()
    return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(offsets) - 1,
                                 [None, pa.array(offsets, width).buffers()[1],
                                  pa.py_buffer(data)])


@pytest.mark.parametrize("large", [False, True])
def test_decode_accepts_valid_strings_ascii_or_not(large):
    kind = pa.large_string() if large else pa.string()
    table = pa.table({"ascii": pa.array(["de", None, "", "https://x"], kind),
                      "utf8": pa.array(["ü", "日本", None, "a\u0000b"], kind)})
    sliced = table.slice(1, 2)
    assert wire.decode_payload(_payload(table)).equals(table)
    assert wire.decode_payload(_payload(sliced)).equals(sliced)


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("offsets, data", [
    ([0, 1, 3], b"a\xff\xfe"),        # not UTF-8
    ([0, 1, 3], b"\xc3\xbca"),        # UTF-8 bytes, but "\xc3\xbc" cut in two
    ([0, 3, 2], b"abc"),              # ASCII, offsets going back
    ([0, 5, 3], b"abc"),              # ASCII, an offset past the data
])
def test_decode_rejects_invalid_strings(offsets, data, large):
    payload = _payload(pa.table({"s": _strings(offsets, data, large)}))
    with pytest.raises(ValueError, match="not a valid Arrow IPC stream"):
        wire.decode_payload(payload)


def test_the_payload_format_does_not_follow_pyarrow_environment_switches(monkeypatch):
    """pyarrow's writers turn to the pre-1.0 IPC format when these are set; payloads do not."""
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64()), "s": ["x", "y", None]})
    expected = bytes(wire.encode_table(table))
    monkeypatch.setenv("ARROW_PRE_0_15_IPC_FORMAT", "1")
    monkeypatch.setenv("ARROW_PRE_1_0_METADATA_VERSION", "1")
    assert bytes(wire.encode_table(table)) == expected
    assert wire.payload_size(table) == len(expected)
    assert wire.decode_payload(expected).equals(table)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\xff\xff\xff\xff\x10\x00"])
def test_decode_rejects_garbage_with_value_error(payload):
    with pytest.raises(ValueError, match="not a valid Arrow IPC stream"):
        wire.decode_payload(payload)


def test_decode_rejects_truncated_payload():
    t = pa.table({"a": list(range(100))})
    payload = wire.encode_batches(t.schema, t.to_batches())
    with pytest.raises(ValueError):
        wire.decode_payload(payload[: len(payload) // 2])


def test_decode_lets_out_of_memory_through(monkeypatch):
    """Out of memory is not the payload's fault: it must fail the flush (and be retried),
    not turn a good entry into a dead letter."""
    t = pa.table({"a": list(range(100))})
    payload = wire.encode_batches(t.schema, t.to_batches())

    def no_memory(*args, **kwargs):
        raise pa.ArrowMemoryError("malloc of size 4096 failed")

    monkeypatch.setattr(pa.ipc, "open_stream", no_memory)
    with pytest.raises(MemoryError):
        wire.decode_payload(payload)


def test_next_id_is_the_smallest_greater_id():
    assert wire.next_id(b"1732480000000-7") == "1732480000000-8"
    assert wire.parse_id("5-0") == (5, 0)


@pytest.mark.parametrize("name,ok", [
    ("events", True), ("_x", False), ("_deltaflush_tmp", False), ("A1_b2", True), ("a" * 128, True),
    ("a" * 129, False), ("1abc", False), ("bad-name", False), ("a b", False), ("", False),
    ("a{b}", False), ("é", False), (None, False), (3, False),
])
def test_table_name_rule(name, ok):
    assert wire.valid_table_name(name) is ok


def test_the_table_name_rule_is_written_the_same_everywhere():
    """The rule of docs/spec.md section 2 is the one the README states, the wire contract
    enforces and the Node.js reference producer checks."""
    from tests.conftest import ROOT

    rule = wire.TABLE_NAME_RE.pattern
    assert rule == "^[A-Za-z][A-Za-z0-9_]{0,127}$"
    for path in ("docs/spec.md", "README.md", "clients/node/producer.js"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert rule in text, f"{path} does not state the table name rule {rule}"
