"""The conformance vectors (spec/vectors/): every payload through the real append check, on
fakeredis and a real redis-server, and through the real flusher, with the outcome its
manifest gives. A producer in another language runs the same files (docs/spec.md,
"Conformance vectors"); ``python -m tests.make_vectors`` wrote them."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer import Settings, wire
from producer.tablecfg import TableConfig
from tests.conftest import ROOT, read_ids
from tests.make_vectors import VECTORS_PROTOCOL
from tests.rawcheck import append, key
from workers.flusher import Flusher
from workers.storage import Storage

VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
BY_NAME = {v["name"]: v for v in MANIFEST["vectors"]}


def test_the_manifest_covers_every_file_and_every_ipc_option():
    files = {p.name for p in VECTORS.glob("*.arrows")}
    assert files == {v["file"] for v in MANIFEST["vectors"]}
    # the vectors are protocol 1's check, which protocol 2 (sharded tables) keeps unchanged
    assert MANIFEST["protocol"] == VECTORS_PROTOCOL <= wire.PROTOCOL
    for needed in ("v4", "v5", "lz4", "zstd", "dictionary", "dictionary-delta",
                   "dictionary-replacement", "multi-batch", "zero-batches", "metadata",
                   "garbage", "truncated", "empty", "wrong-type", "all-types", "names",
                   "invalid-utf8-name"):
        assert needed in BY_NAME, needed


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_canonical_form_of_each_payload(name):
    vector = BY_NAME[name]
    payload = (VECTORS / vector["file"]).read_bytes()
    if vector["canonical"] is None:
        with pytest.raises(ValueError):
            wire.decode_payload(payload)
        # no Schema message at the start, or one whose schema has no canonical form (a name
        # that is not UTF-8): docs/spec.md, section 13
        with pytest.raises((pa.ArrowException, ValueError)):
            wire.canonical_schema(pa.ipc.open_stream(payload).schema)
        return
    # the Schema message alone: a payload cut after it (truncated) has a canonical form
    schema = pa.ipc.open_stream(payload).schema
    assert wire.canonical_schema(schema) == vector["canonical"].encode()
    # and back: the canonical form describes the schema a flush writes
    assert wire.canonical_schema(wire.schema_from_canonical(vector["canonical"])) == \
        vector["canonical"].encode()


def _rows(vector: dict) -> int:
    return int(vector["flush"].get("rows", 1))


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_check_verdict_of_each_payload(any_redis, name):
    """A producer claims the payload's own canonical schema (the table's, for payloads
    without one): the check accepts or refuses as the manifest says, and a refusal leaves
    nothing behind."""
    vector = BY_NAME[name]
    payload = (VECTORS / vector["file"]).read_bytes()
    table_schema = MANIFEST["tables"].get(vector["table"] or "")
    if table_schema:
        any_redis.set(key("t", "schema"), table_schema)
    claimed = vector["canonical"] or table_schema
    verdict = append(any_redis, "t", payload, _rows(vector), claimed)
    if vector["check"] == "accepted":
        assert verdict[0] == 1, verdict
        assert any_redis.xlen(key("t", "delta")) == 1
        assert any_redis.get(key("t", "schema")) == claimed.encode()
        assert int(any_redis.hget(key("t", "pending"), "bytes")) == len(payload) == verdict[2]
    else:
        assert vector["check"] == "conflict"
        assert verdict == [0, table_schema.encode()]
        assert any_redis.xlen(key("t", "delta")) == 0
        assert not any_redis.exists(key("t", "pending"))


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_flush_outcome_of_each_payload(any_redis, storage_dir, name):
    """Appended claiming the table's schema (a producer that did not conform the batch), the
    entry flushes into the rows the manifest says, or becomes a dead letter of its class;
    either way it leaves the delta and the pending counters."""
    vector = BY_NAME[name]
    payload = (VECTORS / vector["file"]).read_bytes()
    table_schema = MANIFEST["tables"].get(vector["table"] or "")
    if table_schema:
        any_redis.set(key("t", "schema"), table_schema)
    claimed = table_schema or vector["canonical"]
    # the vectors test the protocol, not the type policy (spec section 5)
    any_redis.set(key("t", "config"), TableConfig(spark_compatible=False).to_json())
    assert append(any_redis, "t", payload, _rows(vector), claimed)[0] == 1
    result = Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("t")
    assert any_redis.xlen(key("t", "delta")) == 0
    assert any_redis.hmget(key("t", "pending"), "rows", "bytes") == [b"0", b"0"]
    if "dead" in vector["flush"]:
        assert (result.rows, result.dead) == (0, 1)
        [(_, fields)] = any_redis.xrange(key("t", "dead"))
        prefixes = MANIFEST["error_classes"][vector["flush"]["dead"]]
        assert fields[b"error"].decode().startswith(tuple(prefixes)), fields[b"error"]
        assert fields[b"arrow"] == payload  # the original entry, unchanged
        return
    rows = vector["flush"]["rows"]
    assert (result.rows, result.dead) == (rows, 0)
    assert read_ids(storage_dir, "t") == list(range(rows))
    if rows:
        [path] = (storage_dir / "t").glob("*.parquet")
        written = pq.read_schema(path)
        assert all(not f.metadata for f in written)  # field metadata is dropped
        assert not any(pa.types.is_dictionary(f.type) for f in written)  # values, decoded
        if vector["table"]:  # (every type: tests/test_layout.py, with Parquet's nearest)
            # the table's schema, whatever encoding or metadata the payload used
            assert wire.canonical_schema(written) == claimed.encode()
