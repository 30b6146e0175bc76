"""The canonical form of a schema (docs/spec.md, "Canonical schema"): exact bytes of the
spec's worked examples, a round trip over every type a table may have, and what is and is
not part of a table's schema."""

from __future__ import annotations

import json
import shutil
import subprocess

import fakeredis
import pyarrow as pa
import pytest

from producer import Producer, Settings, wire
from producer.errors import UnsupportedData
from tests.conftest import ROOT
from tests.make_vectors import all_types
from tests.rawcheck import append, key
from tests.test_layout import ALL_TYPES
from workers.flusher import Flusher
from workers.storage import Storage

#: The worked examples of docs/spec.md, byte for byte (the spec quotes these strings).
EXAMPLES = [
    (pa.schema([("id", pa.int64()), ("name", pa.string())]),
     '[{"children":[],"name":"id","nullable":true,"type":"l"},'
     '{"children":[],"name":"name","nullable":true,"type":"u"}]'),
    (pa.schema([pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
                ("price", pa.decimal128(12, 2)), ("tags", pa.list_(pa.string()))]),
     '[{"children":[],"name":"ts","nullable":false,"type":"tsu:UTC"},'
     '{"children":[],"name":"price","nullable":true,"type":"d:12,2"},'
     '{"children":[{"children":[],"name":"item","nullable":true,"type":"u"}],'
     '"name":"tags","nullable":true,"type":"+l"}]'),
    (pa.schema([("attrs", pa.map_(pa.string(), pa.float64())),
                ("point", pa.struct([("x", pa.int32()), ("y", pa.int32())]))]),
     '[{"children":[{"children":[{"children":[],"name":"key","nullable":false,"type":"u"},'
     '{"children":[],"name":"value","nullable":true,"type":"g"}],"name":"entries",'
     '"nullable":false,"type":"+s"}],"name":"attrs","nullable":true,"type":"+m"},'
     '{"children":[{"children":[],"name":"x","nullable":true,"type":"i"},'
     '{"children":[],"name":"y","nullable":true,"type":"i"}],"name":"point",'
     '"nullable":true,"type":"+s"}]'),
    (pa.schema([('say "hi"\n', pa.int8()), ("<é>\x01", pa.bool_())]),
     '[{"children":[],"name":"say \\"hi\\"\\n","nullable":true,"type":"c"},'
     '{"children":[],"name":"<é>\\u0001","nullable":true,"type":"b"}]'),
]


@pytest.mark.parametrize("schema, text", EXAMPLES)
def test_worked_examples_are_exact(schema, text):
    assert wire.canonical_schema(schema) == text.encode("utf-8")
    assert wire.schema_from_canonical(text.encode()) == schema


def test_the_worked_examples_are_the_ones_in_the_spec():
    text = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    for _, example in EXAMPLES:
        assert example in text.replace("\n", ""), example[:60]


EXTRA_TYPES = {
    "f16": pa.float16(), "dec32": pa.decimal32(5, 2), "dec64": pa.decimal64(15, 3),
    "flist": pa.list_(pa.field("x", pa.int16(), nullable=False), 3),
    "map_of_lists": pa.map_(pa.int32(), pa.list_(pa.struct([("a", pa.date32())]))),
    "dur_s": pa.duration("s"), "ts_tz": pa.timestamp("s", tz="+01:00"),
}


@pytest.mark.parametrize("schema", [
    ALL_TYPES.schema, all_types().schema, pa.schema(EXTRA_TYPES),
    pa.schema([pa.field(n, t, nullable=False) for n, t in EXTRA_TYPES.items()]),
], ids=["readme-types", "vector-types", "more-types", "not-nullable"])
def test_every_type_round_trips(schema):
    canonical = wire.canonical_schema(schema)
    back = wire.schema_from_canonical(canonical)
    assert wire.canonical_schema(back) == canonical
    for want, got in zip(schema, back, strict=True):
        plain = want.type.value_type if pa.types.is_dictionary(want.type) else want.type
        assert (got.name, got.nullable) == (want.name, want.nullable)
        assert got.type.equals(plain), (want, got)


@pytest.mark.parametrize("a, b", [
    (pa.dictionary(pa.int32(), pa.string()), pa.string()),
    (pa.dictionary(pa.int8(), pa.string(), ordered=True), pa.string()),
    (pa.list_(pa.field("element", pa.int64())), pa.list_(pa.int64())),
    (pa.map_(pa.string(), pa.int64(), keys_sorted=True), pa.map_(pa.string(), pa.int64())),
    (pa.list_(pa.dictionary(pa.int16(), pa.string())), pa.list_(pa.string())),
    (pa.uuid(), pa.binary(16)),
], ids=["dictionary", "ordered-dictionary", "list-child-name", "map-keys-sorted",
        "nested-dictionary", "extension"])
def test_encodings_are_not_part_of_the_schema(a, b):
    assert wire.canonical_schema(pa.schema([("c", a)])) == \
        wire.canonical_schema(pa.schema([("c", b)]))


def test_metadata_is_not_part_of_the_schema_and_ipc_bytes_do_not_matter():
    plain = pa.schema([("id", pa.int64()), ("name", pa.string())])
    decorated = plain.with_metadata({"pandas": "{}"}).set(
        0, pa.field("id", pa.int64(), metadata={"doc": "the key"}))
    # what the check compared before protocol 1
    assert plain.serialize().to_pybytes() != decorated.serialize().to_pybytes()
    assert wire.canonical_schema(plain) == wire.canonical_schema(decorated)


@pytest.mark.parametrize("a, b", [
    (pa.field("x", pa.int64()), pa.field("x", pa.int64(), nullable=False)),
    (pa.field("x", pa.int64()), pa.field("X", pa.int64())),
    (pa.field("x", pa.timestamp("us", "UTC")), pa.field("x", pa.timestamp("us", "Etc/UTC"))),
    (pa.field("x", pa.timestamp("us")), pa.field("x", pa.timestamp("ns"))),
    (pa.field("x", pa.string()), pa.field("x", pa.large_string())),
    (pa.field("x", pa.decimal128(10, 2)), pa.field("x", pa.decimal256(10, 2))),
    (pa.field("x", pa.list_(pa.int64())), pa.field("x", pa.list_(
        pa.field("item", pa.int64(), nullable=False)))),
], ids=["nullability", "name", "time-zone", "unit", "large", "decimal-width",
        "child-nullability"])
def test_what_is_part_of_the_schema(a, b):
    assert wire.canonical_schema(pa.schema([a])) != wire.canonical_schema(pa.schema([b]))


def test_field_order_is_part_of_the_schema():
    a, b = pa.field("a", pa.int8()), pa.field("b", pa.int8())
    assert wire.canonical_schema(pa.schema([a, b])) != wire.canonical_schema(pa.schema([b, a]))


@pytest.mark.parametrize("t", [pa.month_day_nano_interval(), pa.string_view(),
                               pa.run_end_encoded(pa.int32(), pa.string()),
                               pa.dense_union([pa.field("a", pa.int8())])])
def test_types_deltaflush_does_not_carry_are_refused_naming_the_column(t):
    with pytest.raises(UnsupportedData, match="'odd'"):
        wire.canonical_schema(pa.schema([("ok", pa.int8()), ("odd", t)]))


@pytest.mark.parametrize("name", ["col", "xyz"], ids=["column", "struct-field"])
def test_a_name_that_is_not_utf8_has_no_canonical_form_and_is_refused(name, tmp_path):
    """docs/spec.md 6.2: a name is Unicode text. Bytes that are not UTF-8 (which arrow-js
    would read as U+FFFD) give a schema no canonical form: the producer refuses the batch
    before writing anything, and the flusher dead-letters such a payload (undecodable)."""
    table = pa.table({"col": [1], "st": [{"xyz": 1}]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    good = sink.getvalue().to_pybytes()
    assert good.count(name.encode()) == 1
    bad = good.replace(name.encode(), name.encode()[:1] + b"\xff" + name.encode()[2:])
    with pytest.raises(UnsupportedData, match="not valid UTF-8"):
        wire.canonical_schema(pa.ipc.open_stream(bad).schema)
    client = fakeredis.FakeRedis()
    with pytest.raises(UnsupportedData, match="not valid UTF-8"):
        Producer(client=client, settings=Settings()).append(
            "t", pa.ipc.open_stream(bad).read_all())
    assert client.keys() == []
    with pytest.raises(ValueError, match="not a valid Arrow IPC stream"):
        wire.decode_payload(bad)
    # appended anyway (by a producer that does not check): a dead letter, class undecodable
    assert append(client, "t", bad, 1, wire.canonical_schema(table.schema).decode())[0] == 1
    assert Flusher(client, Storage(str(tmp_path)), Settings()).flush("t").dead == 1
    [(_, dead)] = client.xrange(key("t", "dead"))
    assert dead[b"error"].startswith(b"not a valid Arrow IPC stream")


def test_a_name_with_a_lone_surrogate_is_refused():
    """Python cannot encode a lone surrogate (JavaScript's JSON.stringify writes it as
    \\udxxx): no canonical form, refused before anything is written."""
    client = fakeredis.FakeRedis()
    with pytest.raises(UnsupportedData, match="surrogates not allowed"):
        Producer(client=client, settings=Settings()).append("t", [{"a\ud800": 1}])
    assert client.keys() == []


@pytest.mark.parametrize("text", [
    b"", b"{}", b"[]", b"[1]", b'[{"name":"a"}]', b"not json",
    b'[{"children":[],"name":"a","nullable":true,"type":"l"},'
    b'{"children":[],"name":"a","nullable":true,"type":"u"}]',
    b'[{"children":[{"children":[],"name":"x","nullable":true,"type":"l"},{"children":[],'
    b'"name":"x","nullable":true,"type":"l"}],"name":"s","nullable":true,"type":"+s"}]',
    b'[{"children":[],"name":"a","nullable":true,"type":"q"}]',
    b'[{"children":[],"name":"a","nullable":"yes","type":"l"}]',
    b'[{"children":[],"name":"a","nullable":true,"type":"+l"}]',
    b'[{"children":[],"name":"a","nullable":true,"type":"d:01,2"}]',
    b'[{"children":[],"name":"a","nullable":true,"type":"w:0"}]',
])
def test_schema_from_canonical_refuses_what_is_not_a_canonical_form(text):
    with pytest.raises(ValueError, match="not a canonical schema"):
        wire.schema_from_canonical(text)


def test_stored_schema_reads_what_earlier_versions_stored():
    """Before protocol 1, ``{T}:schema`` and claims held IPC-serialised schemas."""
    schema = pa.schema([("id", pa.int64()), ("d", pa.dictionary(pa.int32(), pa.string()))])
    assert wire.stored_schema(schema.serialize().to_pybytes()) == wire.normalize(schema)
    assert wire.stored_schema(wire.canonical_schema(schema)) == wire.normalize(schema)
    with pytest.raises(ValueError):
        wire.stored_schema(b"\x00garbage")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_javascript_json_stringify_writes_the_canonical_form():
    """docs/spec.md says JSON.stringify writes the canonical form (keys in order): parsed and
    written again by JavaScript, every canonical form of the vectors comes back byte for
    byte (the names vector has every escape)."""
    forms = [v["canonical"] for v in json.loads(
        (ROOT / "spec" / "vectors" / "manifest.json").read_text())["vectors"] if v["canonical"]]
    forms += [text for _, text in EXAMPLES]
    script = ("const forms = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "process.stdout.write(JSON.stringify(forms.map(f => JSON.stringify(JSON.parse(f)))))")
    done = subprocess.run(["node", "-e", script], input=json.dumps(forms).encode(),
                          capture_output=True, timeout=60, check=True)
    assert json.loads(done.stdout) == forms
