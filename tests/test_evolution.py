"""Schema evolution, batch limits, backpressure, idempotent retries and dead-letter replay."""

import threading

import pyarrow as pa
import pytest

from producer import Producer, SchemaConflict, Settings, wire
from producer.convert import widens
from producer.errors import Backpressure, BatchTooLarge, SchemaRace, UpgradeRequired
from tests.conftest import assert_exactly_once, id_batch
from tests.reliability import refused
from workers.flusher import Flusher
from workers.storage import Storage

K = wire.Keys("deltaflush", "events")


def producer(client, **kw):
    return Producer(client=client, settings=Settings(**kw))


@pytest.mark.parametrize("src,dst,ok", [
    (pa.int8(), pa.int64(), True), (pa.int64(), pa.int32(), False),
    (pa.uint32(), pa.int64(), True), (pa.uint64(), pa.int64(), False),
    (pa.int32(), pa.float64(), True), (pa.int64(), pa.float64(), False),
    (pa.float32(), pa.float64(), True), (pa.float64(), pa.float32(), False),
    (pa.string(), pa.large_string(), True), (pa.large_string(), pa.string(), False),
    (pa.null(), pa.timestamp("ms"), True), (pa.timestamp("ms"), pa.timestamp("us"), False),
    (pa.string(), pa.int64(), False),
])
def test_only_lossless_widening_is_allowed(src, dst, ok):
    assert widens(src, dst) is ok


def test_new_nullable_columns_and_widening_evolve_the_schema(any_redis, storage_dir):
    p1 = producer(any_redis)
    p1.append("events", pa.table({"id": pa.array([0, 1], pa.int32())}))
    # a newer producer adds a column and widens id
    p2 = producer(any_redis)
    p2.append("events", pa.table({"id": pa.array([2], pa.int64()), "tag": ["x"]}))
    # the old producer keeps sending its old shape: conformed to the evolved schema
    p1.append("events", pa.table({"id": pa.array([3], pa.int32())}))
    stored = wire.schema_from_canonical(any_redis.get(K.schema))
    assert stored.field("id").type == pa.int64() and stored.field("tag").nullable
    result = Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    assert result.rows == 4 and result.files == 1 and result.dead == 0
    import pyarrow.dataset as ds

    t = ds.dataset(str(storage_dir / "events")).to_table().sort_by("id")
    assert t.schema.field("id").type == pa.int64()
    assert t.column("tag").to_pylist() == [None, None, "x", None]


def test_a_backlog_spanning_schema_versions_is_read_as_one_table(any_redis, storage_dir):
    """Entries appended under v1 and v2 flush into files of the latest schema."""
    p = producer(any_redis)
    for i in range(5):
        p.append("events", id_batch(i * 10, 10))
    for i in range(5, 10):
        p.append("events", id_batch(i * 10, 10).append_column("extra", pa.array([1.5] * 10)))
    Flusher(any_redis, Storage(str(storage_dir)), Settings(max_file_bytes=2000)).flush("events")
    import duckdb

    con = duckdb.connect()
    n, extras = con.execute(
        f"select count(*), count(extra) from read_parquet('{storage_dir}/events/*.parquet')"
    ).fetchone()
    assert (n, extras) == (100, 50)
    assert_exactly_once(storage_dir, "events", 100)


def test_schema_evolving_during_a_flush_rolls_the_file(any_redis, storage_dir, monkeypatch):
    p = producer(any_redis)
    p.append("events", id_batch(0, 10))
    f = Flusher(any_redis, Storage(str(storage_dir)), Settings())
    real_mget = any_redis.mget
    fired = []

    def mget_then_evolve(*keys):
        value = real_mget(*keys)
        if K.schema in keys and not fired:
            fired.append(True)
            producer(any_redis).append(
                "events", id_batch(10, 10).append_column("extra", pa.array([1] * 10)))
        return value

    monkeypatch.setattr(any_redis, "mget", mget_then_evolve)
    first = f.flush("events")
    monkeypatch.undo()
    assert first.dead == 0 and first.rows == 20 and first.files == 2
    assert_exactly_once(storage_dir, "events", 20)


def test_incompatible_changes_are_still_conflicts(any_redis):
    p = producer(any_redis)
    p.append("events", id_batch(0, 2))
    with pytest.raises(SchemaConflict, match="'value'.*double.*string"):
        p.append("events", id_batch(2, 2).set_column(3, "value", pa.array(["a", "b"])))
    with pytest.raises(SchemaConflict, match="'id'"):
        p.append("events", id_batch(2, 2).set_column(0, "id", pa.array([1.5, 2.5])))
    refused("lossy type change (int64 to double)", 2, any_redis.xlen(K.delta) - 1)


def test_batch_over_the_size_limit_is_refused(any_redis):
    p = producer(any_redis, max_batch_bytes=10_000)
    with pytest.raises(BatchTooLarge, match="DELTAFLUSH_MAX_BATCH_BYTES") as err:
        p.append("events", id_batch(0, 1000))
    assert isinstance(err.value, ValueError) and err.value.size > 10_000
    refused("batch over DELTAFLUSH_MAX_BATCH_BYTES", 1000, any_redis.xlen(K.delta))
    p.append_many("events", id_batch(0, 1000).to_batches(max_chunksize=100))
    assert any_redis.xlen(K.delta) == 10


def test_backpressure_refuses_and_counts_then_lets_through(any_redis, storage_dir):
    p = producer(any_redis, max_pending_bytes=2000)
    p.append("events", id_batch(0, 100))  # over the limit after this one
    with pytest.raises(Backpressure) as err:
        p.append("events", id_batch(100, 100))
    assert not isinstance(err.value, ValueError)
    assert err.value.pending_bytes >= 2000 and "DELTAFLUSH_MAX_PENDING_BYTES" in str(err.value)
    refused("append over DELTAFLUSH_MAX_PENDING_BYTES (backpressure)", 100,
            any_redis.xlen(K.delta) - 1)
    assert any_redis.hget(K.stats, "backpressure") == b"1"
    Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    p.append("events", id_batch(100, 100))
    assert any_redis.xlen(K.delta) == 1


def test_append_many_refused_midway_says_which_batches_are_in(any_redis, monkeypatch):
    """Backpressure after some batches of one append_many call: the error carries the IDs
    of those appended (None for the rest), so the caller retries only the rest."""
    import producer.client as client_module

    size = len(wire.encode_batches(id_batch(0, 100).schema, id_batch(0, 100).to_batches()))
    p = producer(any_redis, max_pending_bytes=int(size * 2.5))
    monkeypatch.setattr(client_module, "SEND_GROUP_BYTES", size * 2)  # several groups
    with pytest.raises(Backpressure) as err:
        p.append_many("events", [id_batch(i * 100, 100) for i in range(6)])
    appended = err.value.appended
    assert [i is not None for i in appended] == [True, True, True, False, False, False]
    assert [e[0].decode() for e in any_redis.xrange(K.delta)] == appended[:3]
    assert "3 of the 6 batches" in "".join(err.value.__notes__)
    assert int(any_redis.hget(K.pending, "rows")) == 300


def test_append_with_timeout_waits_for_the_workers(real_redis, storage_dir):
    p = producer(real_redis, max_pending_bytes=2000)
    p.append("events", id_batch(0, 100))
    f = Flusher(real_redis, Storage(str(storage_dir)), Settings())
    waiting = threading.Thread(target=lambda: p.append("events", id_batch(100, 100),
                                                       timeout_s=30))
    waiting.start()
    f.flush("events")
    waiting.join()
    f.flush("events")
    assert_exactly_once(storage_dir, "events", 200)


def test_a_retried_append_is_not_added_twice(any_redis):
    """The reply of an append is lost and the call is sent again: one entry."""
    p = producer(any_redis)
    keys = p._keys("events")
    [item] = p._encode([p._prepare("events", id_batch(0, 3))])
    first = p._accepted(keys, item, p._transaction(keys, [item])[0])
    again = p._accepted(keys, item, p._transaction(keys, [item])[0])
    assert first == again and any_redis.xlen(K.delta) == 1
    assert [e[0].decode() for e in any_redis.xrange(K.delta)] == [first]
    assert int(any_redis.hget(K.pending, "rows")) == 3


def test_dead_letters_are_replayed_once_they_decode(any_redis, storage_dir):
    p = producer(any_redis)
    p.append("events", id_batch(0, 5))
    good = id_batch(5, 5)
    # a foreign producer wrote a batch with a wrong type, and some garbage
    wrong = good.set_column(0, "id", pa.array([str(i) for i in range(5, 10)]))
    any_redis.xadd(K.delta, {"arrow": wire.encode_batches(wrong.schema, wrong.to_batches())})
    any_redis.xadd(K.delta, {"arrow": b"garbage"})
    f = Flusher(any_redis, Storage(str(storage_dir)), Settings())
    assert f.flush("events").dead == 2
    assert p.replay_dead("events") == (0, 2)  # still wrong
    # the operator fixes the entry in place (here: rewrite it with the right type)
    entry_id = any_redis.xrange(K.dead)[0][0]
    any_redis.xdel(K.dead, entry_id)
    any_redis.xadd(K.dead, {"arrow": wire.encode_batches(good.schema, good.to_batches()),
                            "error": "fixed"})
    assert p.replay_dead("events") == (1, 1)
    assert any_redis.xlen(K.dead) == 1
    f.flush("events")
    assert_exactly_once(storage_dir, "events", 10)


def _count_sends(p, monkeypatch, before=None):
    """Count the payloads ``p`` sends; ``before(n)`` runs before the n-th send."""
    sent = []
    real = p._transaction

    def counting(keys, items):
        if before is not None:
            before(len(sent))
        sent.extend(items)
        return real(keys, items)

    monkeypatch.setattr(p, "_transaction", counting)
    return sent


def test_a_fresh_producer_learns_the_schema_before_sending(any_redis, monkeypatch):
    """The first append of a table from a process reads its schema along with registering
    it: a conflict is raised before any payload is sent, a reorderable batch is conformed
    before its first send."""
    producer(any_redis).append("events", id_batch(0, 2))
    p = producer(any_redis)
    sent = _count_sends(p, monkeypatch)
    with pytest.raises(SchemaConflict, match="'value'"):
        p.append("events", id_batch(2, 2).set_column(3, "value", pa.array(["a", "b"])))
    assert sent == []
    p2 = producer(any_redis)
    sent = _count_sends(p2, monkeypatch)
    p2.append("events", id_batch(2, 2).select(["value", "name", "id", "ts"]))
    assert len(sent) == 1 and any_redis.xlen(K.delta) == 2


def test_a_schema_race_is_retried_a_bounded_number_of_times(any_redis, monkeypatch):
    """Another producer evolves the table before each send: the batch is reshaped and sent
    again at most SCHEMA_RACES times, then SchemaRace (retryable) and nothing written."""
    import producer.client as client_module

    p = producer(any_redis)
    p.append("events", id_batch(0, 1))
    other = producer(any_redis)

    def evolve_meanwhile(n):
        other.append("events", id_batch(100 + n, 1).append_column(
            f"extra{n}", pa.array([n], pa.int64())))

    sent = _count_sends(p, monkeypatch, evolve_meanwhile)
    with pytest.raises(SchemaRace) as err:
        p.append("events", id_batch(1, 1))
    assert len(sent) == client_module.SCHEMA_RACES + 1 and not isinstance(err.value, ValueError)
    ids = [t.column("id")[0].as_py() for t in
           (wire.decode_payload(f[b"arrow"]) for _, f in any_redis.xrange(K.delta))]
    assert 1 not in ids  # the raced batch is not in


@pytest.mark.parametrize("returned", ["schema", "evolves_from"])
def test_a_conflict_returning_the_schema_just_used_is_not_sent_again(
        any_redis, monkeypatch, returned):
    """docs/spec.md, section 8: a CONFLICT that returns ARGV 1 or ARGV 4 (which no protocol-1
    check does) would make the producer send the very same payload again: SchemaRace at
    once, after one send."""
    p = producer(any_redis)
    p.append("events", id_batch(0, 1))
    sent = []

    def wrong_check(keys, items):
        sent.extend(items)
        [item] = items
        return [[0, item.schema_bytes if returned == "schema" else item.evolves_from]]

    monkeypatch.setattr(p, "_transaction", wrong_check)
    batch = id_batch(1, 1)
    if returned == "evolves_from":  # an evolution: ARGV 4 is the stored schema
        batch = batch.append_column("extra", pa.array([1], pa.int64()))
    with pytest.raises(SchemaRace, match="already shaped for"):
        p.append("events", batch)
    assert len(sent) == 1 and any_redis.xlen(K.delta) == 1
    assert (sent[0].evolves_from != b"") == (returned == "evolves_from")


def test_a_race_that_becomes_a_real_conflict_says_what_differs(any_redis, monkeypatch):
    p = producer(any_redis)
    p.append("events", id_batch(0, 1))
    fired = []

    def add_tag_as_int(n):
        if not fired:
            fired.append(n)
            producer(any_redis).append("events", id_batch(50, 1).append_column(
                "tag", pa.array([7], pa.int64())))

    sent = _count_sends(p, monkeypatch, add_tag_as_int)
    with pytest.raises(SchemaConflict) as err:
        p.append("events", id_batch(1, 1).append_column("tag", pa.array(["x"])))
    e = err.value
    assert (e.column, e.table_type, e.batch_type) == ("tag", "int64", "string")
    assert len(sent) == 1  # refused once; the conflict was then found locally


def test_nullability_differences_are_named(any_redis):
    p = producer(any_redis)
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), ("v", pa.int64())])
    p.append("events", pa.table({"id": [1], "v": [2]}, schema=schema))
    with pytest.raises(SchemaConflict) as err:
        p.append("events", pa.table({"id": [None, 2], "v": [3, 4]}))
    assert (err.value.column, err.value.table_type, err.value.batch_type) == (
        "id", "int64 not null", "int64 with nulls")
    p.append("events", pa.table({"id": [5], "v": [6]}))  # nullable, but no nulls: fits
    assert any_redis.xlen(K.delta) == 2


def test_a_table_stored_by_an_earlier_version_is_converted_on_the_next_append(
        any_redis, monkeypatch, storage_dir):
    """Before protocol 1, ``{T}:schema`` held IPC bytes. The first append replaces them with
    the canonical form (compare-and-set), in one send; the flusher reads either."""
    t = id_batch(0, 3)
    any_redis.set(K.schema, t.schema.serialize().to_pybytes())
    any_redis.xadd(K.delta, {"arrow": wire.encode_batches(t.schema, t.to_batches())})
    p = producer(any_redis)
    sent = _count_sends(p, monkeypatch)
    p.append("events", id_batch(3, 3))
    assert len(sent) == 1
    assert any_redis.get(K.schema) == wire.canonical_schema(t.schema)
    assert Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events").rows == 6


def test_an_equivalent_stored_form_is_brought_to_the_canonical_one(any_redis, monkeypatch):
    """A foreign producer that stored its schema with other key order or spacing (not
    canonical, same schema): a Python append fits it, and stores the canonical form."""
    sloppy = ('[ {"type": "l", "name": "id", "nullable": true, "children": []},'
              ' {"name": "ts", "type": "tsu:UTC", "nullable": true, "children": []},'
              ' {"name": "name", "type": "u", "nullable": true, "children": []},'
              ' {"name": "value", "type": "g", "nullable": true, "children": []} ]')
    any_redis.set(K.schema, sloppy)
    p = producer(any_redis)
    sent = _count_sends(p, monkeypatch)
    p.append("events", id_batch(0, 2))
    assert len(sent) == 1
    assert any_redis.get(K.schema) == wire.canonical_schema(id_batch(0, 1).schema)


UNREADABLE = f"stored schema is not a protocol-{wire.PROTOCOL} canonical schema"


@pytest.mark.parametrize("stored", [
    b"[not json", b"[1]", b'[{"children":[],"name":"id","nullable":true,"type":"q"}]',
    b'[{"children":[],"name":"id","nullable":true,"type":"l"},'
    b'{"children":[],"name":"id","nullable":true,"type":"l"}]',
], ids=["not-json", "not-fields", "unknown-type", "duplicate-name"])
def test_a_stored_schema_that_cannot_be_read_refuses_the_append_and_stays(
        any_redis, monkeypatch, stored):
    """docs/spec.md 6.4: a stored value starting with '[' that is no canonical schema (a
    later protocol's, or a faulty writer's): nothing is sent, nothing replaces it. The same
    for such a value returned by a CONFLICT."""
    any_redis.set(K.schema, stored)
    p = producer(any_redis)
    sent = _count_sends(p, monkeypatch)
    with pytest.raises(ValueError, match=UNREADABLE):
        p.append("events", id_batch(0, 1))
    assert sent == [] and any_redis.get(K.schema) == stored and any_redis.xlen(K.delta) == 0
    any_redis.delete(K.schema)
    p2 = producer(any_redis)
    p2._register(K)  # knows the table has no schema yet; then a faulty writer stores one
    any_redis.set(K.schema, stored)
    sent = _count_sends(p2, monkeypatch)
    with pytest.raises(ValueError, match=UNREADABLE):
        p2.append("events", id_batch(0, 1))
    assert len(sent) == 1 and any_redis.get(K.schema) == stored
    assert any_redis.xlen(K.delta) == 0


def test_dictionary_columns_fit_a_string_column(any_redis, storage_dir, monkeypatch):
    """A dictionary is an encoding, not a type: a dictionary-encoded batch appends to a
    table of strings, and the other way round, with no refusal; files hold strings."""
    p = producer(any_redis)
    p.append("events", id_batch(0, 2))
    encoded = id_batch(2, 2).set_column(2, "name", id_batch(2, 2)["name"].dictionary_encode())
    other = producer(any_redis)
    sent = _count_sends(other, monkeypatch)
    other.append("events", encoded)
    assert len(sent) == 1
    result = Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    assert (result.rows, result.dead) == (4, 0)
    import pyarrow.parquet as pq

    [path] = (storage_dir / "events").glob("*.parquet")
    assert pq.read_schema(path).field("name").type == pa.string()


def test_a_table_that_needs_a_later_protocol_is_refused(any_redis):
    later = wire.PROTOCOL + 1
    any_redis.set(K.protocol, later)
    with pytest.raises(UpgradeRequired, match=f"protocol {later}.*upgrade") as err:
        producer(any_redis).append("events", id_batch(0, 1))
    assert (err.value.required, err.value.spoken) == (later, wire.PROTOCOL)
    assert any_redis.xlen(K.delta) == 0
