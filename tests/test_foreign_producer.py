"""A producer in another language against a real redis-server and real Celery workers,
driven through the command line of docs/spec.md, Appendix A: tables created from either
side and appended to from the other, schema evolution across languages, a conflicting
batch refused, garbage dead-lettered, a flush requested through Redis alone, and every
conformance vector through the foreign producer's own transaction.

The foreign producers: ``node clients/node/cli.js`` (skipped until ``clients/node`` has its
``node_modules``; never skipped with ``DELTAFLUSH_REQUIRE_NODE=1``, as in CI), the command
in ``DELTAFLUSH_FOREIGN_PRODUCER`` if set, and always the same command line over the Python
producer (``tests/conformance_cli.py``), which tests the harness itself.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from producer import Producer, Settings, wire
from producer.tablecfg import TableConfig
from tests.conftest import ROOT, id_batch, landed, read_ids, wait_for
from tests.make_vectors import ERROR_CLASSES
from tests.test_vectors import BY_NAME, MANIFEST, VECTORS

NODE = ROOT / "clients" / "node"


def _producers() -> list[Any]:
    node_ready = (NODE / "node_modules").is_dir() and shutil.which("node") is not None
    node_ready = node_ready or os.environ.get("DELTAFLUSH_REQUIRE_NODE") == "1"  # CI: fail
    found = [
        pytest.param([sys.executable, "-m", "tests.conformance_cli"], id="python"),
        pytest.param(["node", str(NODE / "cli.js")], id="node", marks=pytest.mark.skipif(
            not node_ready, reason="clients/node has no node_modules (npm ci in clients/node)")),
    ]
    if os.environ.get("DELTAFLUSH_FOREIGN_PRODUCER"):
        found.append(pytest.param(shlex.split(os.environ["DELTAFLUSH_FOREIGN_PRODUCER"]),
                                  id="foreign"))
    return found


#: The schema of tests.conftest.id_batch, as a foreign producer builds it from JSON rows.
SCHEMA = pa.schema([("id", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")),
                    ("name", pa.string()), ("value", pa.float64())])


def rows(start: int, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": i, "ts": 1_700_000_000_000_000 + i, "name": f"f{i}", "value": i * 0.25,
             **{k: v(i) for k, v in extra.items()}} for i in range(start, start + n)]


class Foreign:
    """One foreign producer's command line, for one Redis."""

    def __init__(self, name: str, command: list[str], redis_url: str, workdir: Path) -> None:
        self.name, self.command, self.redis_url, self.workdir = name, command, redis_url, \
            workdir
        self.files = 0

    def _file(self, content: bytes | str) -> str:
        self.files += 1
        path = self.workdir / f"arg{self.files}"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def run(self, *args: str) -> tuple[int, bytes]:
        done = subprocess.run([*self.command, *args], cwd=ROOT, capture_output=True,
                              timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return done.returncode, done.stdout

    def _result(self, *args: str) -> tuple[int, dict[str, Any]]:
        status, out = self.run(*args, "--redis", self.redis_url)
        lines = out.decode().strip().splitlines()
        assert lines, f"{self.command} {args[:3]} printed nothing (status {status})"
        return status, json.loads(lines[-1])

    def append(self, table: str, schema: pa.Schema, data: list[dict[str, Any]],
               max_pending_bytes: int | None = None) -> tuple[int, dict[str, Any]]:
        extra = [] if max_pending_bytes is None else ["--max-pending-bytes",
                                                       str(max_pending_bytes)]
        return self._result("append", "--table", table,
                            "--schema", self._file(wire.canonical_schema(schema)),
                            "--rows", self._file(json.dumps(data)), *extra)

    def append_payload(self, table: str, payload: bytes, schema: str | bytes,
                       row_count: int, max_pending_bytes: int | None = None
                       ) -> tuple[int, dict[str, Any]]:
        extra = [] if max_pending_bytes is None else ["--max-pending-bytes",
                                                       str(max_pending_bytes)]
        return self._result("append", "--table", table, "--schema", self._file(schema),
                            "--payload", self._file(payload), "--row-count", str(row_count),
                            *extra)

    def request_flush(self, table: str) -> tuple[int, dict[str, Any]]:
        return self._result("request-flush", "--table", table)

    def canonical(self, path: Path) -> tuple[int, bytes]:
        return self.run("canonical", "--payload", str(path))


def ok(result: tuple[int, dict[str, Any]]) -> str:
    status, out = result
    assert status == 0 and out.get("ok") is True, out
    return str(out["entry_id"]) if "entry_id" in out else ""


def flushed(root: Path, table: str) -> pa.Table:
    return ds.dataset(str(root / table), format="parquet").to_table().sort_by("id")


@pytest.fixture(params=_producers())
def foreign(request: pytest.FixtureRequest, redis_server: Any, tmp_path: Path) -> Foreign:
    workdir = tmp_path / "foreign"
    workdir.mkdir()
    name = request.node.callspec.id.split("-")[-1]
    return Foreign(name, request.param, redis_server.url, workdir)


@pytest.mark.integration
def test_tables_cross_languages_and_a_worker_flushes_them_exactly_once(
        foreign, fleet, producer_for, real_redis, storage_dir):
    p = producer_for()
    k = {t: wire.Keys("deltaflush", t) for t in ("made_foreign", "made_python", "evolving",
                                                "garbage")}
    # created by the foreign producer, appended to from Python with no refusal
    ok(foreign.append("made_foreign", SCHEMA, rows(0, 10)))
    sends = []
    real_transaction = p._transaction
    p._transaction = lambda keys, items: sends.append(len(items)) or real_transaction(
        keys, items)
    p.append("made_foreign", id_batch(10, 10))
    assert sends == [1], "the foreign producer's schema was not the one Python sends"
    ok(foreign.append("made_foreign", SCHEMA, rows(20, 10)))
    assert real_redis.get(k["made_foreign"].schema) == wire.canonical_schema(SCHEMA)

    # created from Python; the foreign producer's batch has the columns in another order
    p.append("made_python", id_batch(0, 10))
    reordered = pa.schema([SCHEMA.field(n) for n in ("name", "value", "id", "ts")])
    ok(foreign.append("made_python", reordered, rows(10, 10)))
    assert real_redis.get(k["made_python"].schema) == wire.canonical_schema(SCHEMA)

    # evolution across languages
    base = pa.schema([("id", pa.int64()), ("name", pa.string())])
    p.append("evolving", pa.table({"id": [0, 1], "name": ["a", "b"]}, schema=base))
    ok(foreign.append("evolving", base.append(pa.field("extra", pa.float64())),
                      [{"id": i, "name": "f", "extra": i / 2} for i in (2, 3)]))
    p.append("evolving", pa.table({"id": [4, 5], "name": ["c", "d"]}, schema=base))  # stale
    narrow = pa.schema([("id", pa.int32()), ("name", pa.string())])
    ok(foreign.append("evolving", narrow, [{"id": i, "name": "n"} for i in (6, 7)]))
    p.append("evolving", pa.table({"id": [8], "name": ["e"], "flag": [True]}))
    ok(foreign.append("evolving", base, [{"id": 9, "name": "g"}]))
    evolved = base.append(pa.field("extra", pa.float64())).append(pa.field("flag", pa.bool_()))
    assert real_redis.get(k["evolving"].schema) == wire.canonical_schema(evolved)

    # garbage from the foreign producer, between good batches
    ok(foreign.append("garbage", SCHEMA, rows(0, 5)))
    ok(foreign.append_payload("garbage", b"not an Arrow stream", wire.canonical_schema(SCHEMA),
                              1))
    ok(foreign.append("garbage", SCHEMA, rows(5, 5)))

    fleet.worker()
    fleet.beat()
    expected = {"made_foreign": 30, "made_python": 20, "evolving": 10, "garbage": 10}
    for table, n in expected.items():
        wait_for(lambda t=table, n=n: landed(real_redis, t, n), 90, f"{table} to be flushed",
                 0.2)
        assert read_ids(storage_dir, table) == list(range(n)), table
    [(_, dead)] = real_redis.xrange(k["garbage"].dead)
    assert dead[b"arrow"] == b"not an Arrow stream"
    assert dead[b"error"].decode().startswith(tuple(ERROR_CLASSES["undecodable"]))
    table = flushed(storage_dir, "evolving")
    assert table.column("extra").to_pylist() == [None, None, 1.0, 1.5] + [None] * 6
    assert table.column("flag").to_pylist() == [None] * 8 + [True, None]
    assert table.schema.field("id").type == pa.int64()
    assert flushed(storage_dir, "made_foreign").column("name").to_pylist()[:2] == ["f0", "f1"]


@pytest.mark.integration
def test_a_flush_requested_by_the_foreign_producer(foreign, fleet, real_redis, storage_dir):
    """With an hour's flush interval, only the foreign producer's request (one HSET) can
    flush the second batch."""
    fleet.env["DELTAFLUSH_FLUSH_INTERVAL_S"] = "3600"
    fleet.worker()
    fleet.beat()
    ok(foreign.append("events", SCHEMA, rows(0, 5)))  # never scheduled yet: due at once
    wait_for(lambda: landed(real_redis, "events", 5), 90, "the first scheduled flush", 0.2)
    assert read_ids(storage_dir, "events") == list(range(5))
    ok(foreign.append("events", SCHEMA, rows(5, 5)))
    ok(foreign.request_flush("events"))
    wait_for(lambda: landed(real_redis, "events", 10), 90, "the requested flush", 0.2)
    assert read_ids(storage_dir, "events") == list(range(10))


def test_refusals(foreign, real_redis):
    """A conflicting batch is refused naming the column; a table needing a later protocol,
    backpressure and a table from before protocol 1 are handled as docs/spec.md says."""
    k = wire.Keys("deltaflush", "events")
    Producer(client=real_redis, settings=Settings()).append("events", id_batch(0, 2))
    status, out = foreign.append("events", SCHEMA.set(0, pa.field("id", pa.string())),
                                 [{"id": "x", "ts": 1, "name": "n", "value": 1.0}])
    assert (status, out["error"], out["column"]) == (2, "schema_conflict", "id"), out
    assert real_redis.xlen(k.delta) == 1

    later = wire.PROTOCOL + 1  # later than every producer here speaks
    real_redis.set(wire.Keys("deltaflush", "later").protocol, later)
    status, out = foreign.append("later", SCHEMA, rows(0, 1))
    assert (status, out["error"], out["required"]) == (4, "upgrade_required", later), out
    assert real_redis.xlen(wire.Keys("deltaflush", "later").delta) == 0

    ok(foreign.append("full", SCHEMA, rows(0, 10)))
    status, out = foreign.append("full", SCHEMA, rows(10, 10), max_pending_bytes=1)
    assert (status, out["error"]) == (3, "backpressure"), out
    payload = wire.encode_batches(SCHEMA, pa.Table.from_pylist(rows(10, 1), SCHEMA).to_batches())
    status, out = foreign.append_payload("full", bytes(payload), wire.canonical_schema(SCHEMA),
                                         1, max_pending_bytes=1)  # ARGV 5 in both forms
    assert (status, out["error"]) == (3, "backpressure"), out
    assert real_redis.xlen(wire.Keys("deltaflush", "full").delta) == 1

    # out of memory: at registration, or when the transaction is refused
    ok(foreign.append("oom", SCHEMA, rows(0, 1)))
    real_redis.config_set("maxmemory", 1)
    try:
        status, out = foreign.append("oom", SCHEMA, rows(1, 1))
        assert (status, out["error"]) == (5, "out_of_memory"), out
        status, out = foreign.append_payload("oom", bytes(payload),
                                             wire.canonical_schema(SCHEMA), 1)
        assert (status, out["error"]) == (5, "out_of_memory"), out
        status, out = foreign.append("oom_new", SCHEMA, rows(0, 1))
        assert (status, out["error"]) == (5, "out_of_memory"), out
    finally:
        real_redis.config_set("maxmemory", 0)
    assert real_redis.xlen(wire.Keys("deltaflush", "oom").delta) == 1

    # a stored value starting with '[' that is no canonical schema (6.4): refused, untouched
    for n, broken in enumerate([b"[not json", b'[{"children":[],"name":"id","nullable":true,'
                                              b'"type":"q"}]']):
        keys = wire.Keys("deltaflush", f"broken{n}")
        real_redis.set(keys.schema, broken)
        status, out = foreign.append(f"broken{n}", SCHEMA, rows(0, 1))
        assert (status, out["error"]) == (1, "other"), out
        assert real_redis.get(keys.schema) == broken and real_redis.xlen(keys.delta) == 0

    old = wire.Keys("deltaflush", "old")
    real_redis.set(old.schema, SCHEMA.serialize().to_pybytes())  # before protocol 1
    status, out = foreign.append("old", SCHEMA, rows(0, 1))
    if status == 0:  # converted, as the Python producer does
        assert real_redis.get(old.schema) == wire.canonical_schema(SCHEMA)
    else:
        assert status == 1 and "protocol 1" in out["message"], out
        assert real_redis.xlen(old.delta) == 0


#: Appendix A's values of every kind, in a JSON file: integers beyond 2^53 (int64, uint64,
#: nanoseconds since 1970), binary and fixed-size binary as strings (their UTF-8 bytes),
#: decimals as unscaled integers (beyond 2^64 too), maps as objects or lists of pairs.
VALUES_SCHEMA = pa.schema([
    ("id", pa.int64()), ("u64", pa.uint64()), ("ts", pa.timestamp("ns", tz="UTC")),
    ("day", pa.date32()), ("t", pa.time64("us")), ("dur", pa.duration("ms")),
    ("half", pa.float16()), ("bin", pa.binary()), ("lbin", pa.large_binary()),
    ("fixed", pa.binary(3)), ("price", pa.decimal128(10, 2)), ("huge", pa.decimal256(40, 2)),
    ("attrs", pa.map_(pa.string(), pa.int64())), ("tags", pa.list_(pa.string())),
    ("point", pa.struct([("x", pa.int32()), ("y", pa.float64())])),
])
VALUES_ROWS = [
    {"id": 2**63 - 1, "u64": 2**64 - 1, "ts": 1_700_000_000_123_456_789, "day": 19_000,
     "t": 3_600_000_001, "dur": -5, "half": 1.5, "bin": "héllo", "lbin": "", "fixed": "abc",
     "price": 12345, "huge": 1234567890123456789012345678901234567890,
     "attrs": {"a": 1, "b": None}, "tags": ["x", None], "point": {"x": 1, "y": 0.5}},
    {"id": -(2**63), "u64": 0, "ts": -1, "day": -1, "t": 0, "dur": 0, "half": -2.0,
     "bin": "\u0000", "lbin": "日本", "fixed": "xyz", "price": -5, "huge": -1,
     "attrs": [["k", 3], ["k", 4]], "tags": [], "point": {"x": None}},
    {"id": 0},
]


def test_row_values_of_every_kind(foreign, real_redis):
    """Appendix A, Values: the batch a foreign producer builds from JSON rows holds exactly
    the values Python means by them."""
    import decimal
    d = decimal.Decimal
    keys = wire.Keys("deltaflush", "values")  # times and 40 digits: not for Spark (section 5)
    real_redis.set(keys.config, TableConfig(spark_compatible=False).to_json())
    ok(foreign.append("values", VALUES_SCHEMA, VALUES_ROWS))
    [(_, fields)] = real_redis.xrange(keys.delta)
    got = wire.decode_payload(fields[b"arrow"])
    assert wire.canonical_schema(got.schema) == wire.canonical_schema(VALUES_SCHEMA)
    want = pa.table({
        "id": pa.array([2**63 - 1, -(2**63), 0], pa.int64()),
        "u64": pa.array([2**64 - 1, 0, None], pa.uint64()),
        "ts": pa.array([1_700_000_000_123_456_789, -1, None], pa.timestamp("ns", tz="UTC")),
        "day": pa.array([19_000, -1, None], pa.date32()),
        "t": pa.array([3_600_000_001, 0, None], pa.time64("us")),
        "dur": pa.array([-5, 0, None], pa.duration("ms")),
        "half": pa.array([1.5, -2.0, None], pa.float16()),
        "bin": [b"h\xc3\xa9llo", b"\x00", None], "lbin": pa.array([b"", "日本".encode(), None],
                                                                 pa.large_binary()),
        "fixed": pa.array([b"abc", b"xyz", None], pa.binary(3)),
        "price": pa.array([d("123.45"), d("-0.05"), None], pa.decimal128(10, 2)),
        "huge": pa.array([d("12345678901234567890123456789012345678.90"), d("-0.01"), None],
                         pa.decimal256(40, 2)),
        "attrs": pa.array([[("a", 1), ("b", None)], [("k", 3), ("k", 4)], None],
                          pa.map_(pa.string(), pa.int64())),
        "tags": [["x", None], [], None],
        "point": pa.array([{"x": 1, "y": 0.5}, {"x": None, "y": None}, None],
                          VALUES_SCHEMA.field("point").type),
    })
    for name in VALUES_SCHEMA.names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name


@pytest.mark.parametrize("column", [
    pa.field("iv", pa.month_day_nano_interval()), pa.field("view", pa.string_view()),
    pa.field("id", pa.int8()),  # a second column named id
], ids=["interval", "string-view", "duplicate-name"])
def test_canonical_of_a_schema_protocol_1_does_not_carry(foreign, tmp_path, column):
    """Appendix A, canonical: a schema that reads but cannot be a table's exits 1, with
    nothing on stdout."""
    schema = pa.schema([pa.field("id", pa.int64()), column])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    path = tmp_path / "payload.arrows"
    path.write_bytes(sink.getvalue().to_pybytes())
    assert foreign.canonical(path) == (1, b"")


def test_every_vector_through_the_foreign_producer(foreign, real_redis):
    """Each vector's payload, sent in the foreign producer's own transaction with the
    payload's canonical schema claimed, gets the manifest's verdict; its canonical form of
    each payload's schema is the manifest's, byte for byte. (The Python producer's own
    transaction meets every vector in test_vectors.py; here three prove the harness.)"""
    names = ["garbage", "v5", "wrong-type"] if foreign.name == "python" else sorted(BY_NAME)
    for n, name in enumerate(names):
        vector = BY_NAME[name]
        path = VECTORS / vector["file"]
        status, out = foreign.canonical(path)
        if vector["canonical"] is None:
            assert (status, out) == (1, b""), f"{name}: a canonical form of a payload that has none"
        else:
            assert (status, out) == (0, vector["canonical"].encode() + b"\n"), name
        table = f"v{n}"
        table_schema = MANIFEST["tables"].get(vector["table"] or "")
        if table_schema:
            real_redis.set(wire.Keys("deltaflush", table).schema, table_schema)
        status, result = foreign.append_payload(
            table, path.read_bytes(), vector["canonical"] or table_schema,
            int(vector["flush"].get("rows", 1)))
        want = 0 if vector["check"] == "accepted" else 2
        assert status == want, (name, result)
        assert real_redis.xlen(wire.Keys("deltaflush", table).delta) == (want == 0), name


def test_the_command_line_reports_a_schema_race(real_redis, redis_server, monkeypatch,
                                                tmp_path, capsys):
    """Appendix A: a batch that meets a 4th CONFLICT is `schema_race`, exit 6. Here the
    Python command line, in-process, with another producer evolving the table before each
    send (the Node command line's outcomes: clients/node/test)."""
    from tests import conformance_cli

    Producer(client=real_redis, settings=Settings()).append("race", id_batch(0, 1))
    real_transaction = Producer._transaction
    other = Producer(client=real_redis, settings=Settings())
    other._racing = True  # type: ignore[attr-defined]
    sends = []

    def racing(self, keys, items):
        if not getattr(self, "_racing", False):
            sends.append(1)
            other.append("race", id_batch(len(sends), 1).append_column(
                f"extra{len(sends)}", pa.array([1], pa.int64())))
        return real_transaction(self, keys, items)

    monkeypatch.setattr(Producer, "_transaction", racing)
    schema, data = tmp_path / "schema", tmp_path / "rows"
    schema.write_bytes(wire.canonical_schema(SCHEMA))
    data.write_text(json.dumps(rows(10, 1)))
    status = conformance_cli.main(["append", "--redis", redis_server.url, "--table", "race",
                                   "--schema", str(schema), "--rows", str(data)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (status, out["error"], len(sends)) == (6, "schema_race", 4), out
