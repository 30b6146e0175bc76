"""The fast path for small entries (``workers.sources.runs``): a run of entries decoded as one
stream gives exactly what decoding them one by one gives (the same rows, the same dead
letters, the same range), whatever is mixed into it: corrupt entries, other schema versions,
dictionary columns, payloads from the Node producer, entries without or with a wrong
``rows`` field."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import Producer, Settings, wire
from tests.conftest import ROOT, read_ids
from tests.test_fuzz import mutated
from workers.flusher import Flusher
from workers.sources import runs
from workers.sources.reading import EntryReader
from workers.storage import Storage

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])
EVOLVED = pa.schema([("id", pa.int64()), ("name", pa.string()), ("extra", pa.int64())])
NODE = ROOT / "clients" / "node"


def one(i: int, rows: int = 1, **extra: Any) -> pa.Table:
    ids = list(range(i, i + rows))
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "name": pa.array([f"n{n}" for n in ids]),
                     **{k: pa.array([v] * rows, pa.int64()) for k, v in extra.items()}})


def payload(table: pa.Table) -> bytes:
    return bytes(wire.encode_table(table))


def node_payloads(start: int, n: int) -> list[bytes]:
    """``n`` one-row payloads (ids from ``start``) encoded by arrow-js, as the Node producer
    encodes them; skips the test without Node."""
    if not (NODE / "node_modules").is_dir() or shutil.which("node") is None:
        pytest.skip("clients/node has no node_modules (npm ci in clients/node)")
    script = """
const arrow = require(process.argv[1] + '/node_modules/apache-arrow');
const [start, n] = [Number(process.argv[2]), Number(process.argv[3])];
const out = [];
for (let i = start; i < start + n; i++) {
  const t = new arrow.Table({
    id: arrow.vectorFromArray([BigInt(i)], new arrow.Int64()),
    name: arrow.vectorFromArray(['n' + i], new arrow.Utf8())});
  out.push(Buffer.from(arrow.tableToIPC(t, 'stream')).toString('base64'));
}
console.log(JSON.stringify(out));
"""
    proc = subprocess.run(["node", "-e", script, str(NODE), str(start), str(n)],
                          capture_output=True, text=True, check=True, timeout=60)
    return [base64.b64decode(p) for p in json.loads(proc.stdout)]


def entries_of(items: list[tuple[bytes | None, bytes | None]]
               ) -> list[tuple[str, dict[bytes, bytes]]]:
    out = []
    for n, (data, rows) in enumerate(items, 1):
        fields = {}
        if data is not None:
            fields[wire.FIELD_ARROW] = data
        if rows is not None:
            fields[wire.FIELD_ROWS] = rows
        out.append((f"{n}-0", fields))
    return out


def chunked(entries: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(entries), size):
        yield entries[i:i + size]


def read(entries: list[Any], chunk: int, max_bytes: int, fast: bool,
         monkeypatch: pytest.MonkeyPatch) -> tuple[pa.Table | None, Any, int]:
    """One range read from ``entries`` (stored schema ``SCHEMA``, evolved to ``EVOLVED``):
    its data as one table, its record, and how many runs were decoded at once."""
    used = 0
    real = runs.decode_run

    def counting(*args: Any) -> pa.Table | None:
        nonlocal used
        table = real(*args)
        used += table is not None
        return table

    with monkeypatch.context() as m:
        m.setattr(runs, "MIN_RUN", runs.MIN_RUN if fast else 2**62)
        m.setattr("workers.sources.reading.decode_run", counting)
        reader = EntryReader("events", "events", chunked(entries, chunk), None, SCHEMA, "",
                             max_bytes, lambda s: EVOLVED if s == SCHEMA else None)
        parts = list(reader)
    data = pa.concat_tables(parts).combine_chunks() if parts else None
    return data, reader.range(), used


def same_either_way(entries: list[Any], chunk: int, max_bytes: int,
                    monkeypatch: pytest.MonkeyPatch) -> int:
    fast, fast_range, used = read(entries, chunk, max_bytes, True, monkeypatch)
    slow, slow_range, _ = read(entries, chunk, max_bytes, False, monkeypatch)
    if fast_range != slow_range and max_bytes < 2**40 and fast_range and slow_range:
        # The size limit is approximate: a run's combined table can count fewer bytes than
        # its entries one by one (a cast, nulls), so a range may end an entry later; both
        # ranges start at the same entry, and up to the shorter one they read the same.
        assert fast_range.first == slow_range.first
        common = entries[:min(fast_range.count, slow_range.count)]
        fast, fast_range, used = read(common, chunk, 2**40, True, monkeypatch)
        slow, slow_range, _ = read(common, chunk, 2**40, False, monkeypatch)
    assert fast_range == slow_range
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert fast.schema == slow.schema and fast.equals(slow)
    return used


def test_a_run_of_good_entries_is_decoded_at_once(monkeypatch):
    entries = entries_of([(payload(one(i)), b"1") for i in range(500)])
    data, rng, used = read(entries, 128, 2**40, True, monkeypatch)
    assert used == 4 and data.column("id").to_pylist() == list(range(500))
    assert (rng.count, rng.pending_rows, rng.dead) == (500, 500, ())
    assert same_either_way(entries, 128, 2**40, monkeypatch) == 4


def test_a_corrupt_entry_in_a_run_is_a_dead_letter_and_the_others_land(monkeypatch):
    good = [payload(one(i)) for i in range(100)]
    items: list[tuple[bytes | None, bytes | None]] = [(p, b"1") for p in good]
    items[40] = (good[40][:-20] + b"\x00" * 12 + good[40][-8:], b"1")  # body overwritten
    items[60] = (good[60], b"3")  # says 3 rows, holds 1
    items[70] = (good[70][:len(good[70]) // 2], b"1")  # truncated
    entries = entries_of(items)
    data, rng, _ = read(entries, 100, 2**40, True, monkeypatch)
    dead = [entry_id for entry_id, _ in rng.dead]
    assert "71-0" in dead and "60-0" not in dead  # a wrong rows field is no reason
    assert set(data.column("id").to_pylist()) | {int(d.split("-")[0]) - 1 for d in dead} \
        == set(range(100))
    same_either_way(entries, 100, 2**40, monkeypatch)


def test_dictionary_columns_are_decoded_entry_by_entry(monkeypatch):
    # an entry's batches may use a dictionary sent only by the entry before it in a joined
    # stream: alone it lacks it, so dictionary schemas never take the fast path
    def dict_payload(i: int) -> bytes:
        t = one(i)
        return payload(t.set_column(1, "name", t.column("name").dictionary_encode()))

    entries = entries_of([(dict_payload(i), b"1") for i in range(50)])
    data, rng, used = read(entries, 50, 2**40, True, monkeypatch)
    assert used == 0 and data.column("id").to_pylist() == list(range(50))
    assert data.schema == SCHEMA and not rng.dead
    same_either_way(entries, 50, 2**40, monkeypatch)


def test_node_payloads_form_runs_of_their_own(monkeypatch):
    node = node_payloads(0, 30)
    assert runs.schema_prefix(node[0]) != runs.schema_prefix(payload(one(0)))
    items = [(node[i], b"1") if i % 10 < 5 else (payload(one(i)), b"1") for i in range(30)]
    entries = entries_of(items)
    data, rng, used = read(entries, 30, 2**40, True, monkeypatch)
    assert used == 6 and data.column("id").to_pylist() == list(range(30))
    assert not rng.dead
    same_either_way(entries, 30, 2**40, monkeypatch)


def test_a_newer_schema_version_ends_the_range_as_entry_by_entry(monkeypatch):
    items = [(payload(one(i)), b"1") for i in range(20)]
    items += [(payload(one(i, extra=7)), b"1") for i in range(20, 40)]
    entries = entries_of(items)
    data, rng, used = read(entries, 16, 2**40, True, monkeypatch)
    assert used >= 1 and rng.count == 20 and data.num_rows == 20
    same_either_way(entries, 16, 2**40, monkeypatch)
    # a range starting at the newer version switches to it
    data, rng, _ = read(entries[20:], 16, 2**40, True, monkeypatch)
    assert data.schema == EVOLVED and rng.count == 20


GOOD_ONE = payload(one(0))
KINDS = st.sampled_from(["good", "good", "good", "ten", "mutated", "norows", "badrows",
                         "dict", "evolved", "old", "garbage", "noarrow"])


@st.composite
def entry(draw: Any) -> tuple[bytes | None, bytes | None]:
    kind = draw(KINDS)
    i = draw(st.integers(0, 10_000))
    if kind == "good":
        return payload(one(i)), b"1"
    if kind == "ten":
        return payload(one(i, 10)), b"10"
    if kind == "mutated":
        return draw(mutated(GOOD_ONE)), b"1"
    if kind == "norows":
        return payload(one(i)), None
    if kind == "badrows":
        return payload(one(i)), draw(st.sampled_from([b"0", b"2", b"x", b""]))
    if kind == "dict":
        t = one(i)
        return payload(t.set_column(1, "name", t.column("name").dictionary_encode())), b"1"
    if kind == "evolved":
        return payload(one(i, extra=i)), b"1"
    if kind == "old":  # an older version: no `name`
        return payload(one(i).drop_columns(["name"])), b"1"
    if kind == "garbage":
        return draw(st.binary(max_size=64)), b"1"
    return None, b"1"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(st.lists(entry(), min_size=1, max_size=60), st.integers(1, 64),
       st.sampled_from([2**40, 2_000, 300]))
def test_runs_read_exactly_like_entries_one_by_one(monkeypatch, items, chunk, max_bytes):
    same_either_way(entries_of(items), chunk, max_bytes, monkeypatch)


def test_a_flush_of_small_entries_with_corrupt_and_foreign_ones(real_redis, storage_dir):
    """Through Redis and a Flusher: one-row appends from the Python producer, with payloads
    from the Node producer, dictionary-encoded ones and corrupt ones among them."""
    settings_ = Settings()
    keys = wire.Keys(settings_.key_prefix, "events")
    producer = Producer(client=real_redis, settings=settings_)
    node = iter(node_payloads(0, 1000))
    expected, corrupt = set(), set()
    for i in range(1000):
        if i % 97 == 13:  # written around the producer, as a faulty producer would
            entry_id = real_redis.xadd(keys.delta, {"arrow": GOOD_ONE[:-30], "rows": 1})
            corrupt.add(entry_id.decode())
            next(node)
            continue
        if i % 10 == 3:
            real_redis.xadd(keys.delta, {"arrow": next(node), "rows": 1})
            expected.add(i)
            continue
        next(node)
        table = one(i)
        if i % 50 == 7:
            table = table.set_column(1, "name", table.column("name").dictionary_encode())
        producer.append("events", table)
        expected.add(i)
    result = Flusher(real_redis, Storage(str(storage_dir)), settings_).flush("events")
    assert result.status == "ok" and result.rows == len(expected)
    assert read_ids(storage_dir, "events") == sorted(expected)
    dead = {f[wire.FIELD_ENTRY_ID].decode() for _, f in real_redis.xrange(keys.dead)}
    assert dead == corrupt
    assert real_redis.xlen(keys.delta) == 0
