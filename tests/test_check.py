"""The append check as docs/spec.md specifies it ("The append transaction"), driven raw as a
producer in another language drives it: every reply, the compare-and-set, the dedup window,
the backpressure rule, the protocol version, and bad arguments."""

from __future__ import annotations

import pyarrow as pa
import pytest

from producer import wire
from tests.make_vectors import BASE, base, stream
from tests.rawcheck import CHECK, append, key

PAYLOAD = stream(BASE, [base()])
SCHEMA = wire.canonical_schema(BASE)
EVOLVED = wire.canonical_schema(BASE.append(pa.field("extra", pa.int64())))


def test_first_append_sets_the_schema_and_counts(any_redis):
    code, entry_id, pending = append(any_redis, "t", PAYLOAD, 3, SCHEMA)
    assert (code, pending) == (1, len(PAYLOAD))
    assert [e[0] for e in any_redis.xrange(key("t", "delta"))] == [entry_id]
    assert any_redis.get(key("t", "schema")) == SCHEMA
    assert any_redis.hgetall(key("t", "pending")) == {b"rows": b"3",
                                                      b"bytes": str(len(PAYLOAD)).encode()}
    assert any_redis.sismember("deltaflush:tables", "t")


def test_a_retried_batch_id_returns_the_first_entry_and_adds_nothing(any_redis):
    first = append(any_redis, "t", PAYLOAD, 3, SCHEMA, batch_id="b1")
    again = append(any_redis, "t", PAYLOAD, 3, SCHEMA, batch_id="b1")
    assert again[:2] == first[:2] and any_redis.xlen(key("t", "delta")) == 1
    assert 0 < any_redis.ttl(key("t", "batch:b1")) <= 120
    assert any_redis.hget(key("t", "pending"), "rows") == b"3"


def test_another_schema_is_refused_with_the_stored_one(any_redis):
    append(any_redis, "t", PAYLOAD, 3, SCHEMA)
    assert append(any_redis, "t", PAYLOAD, 3, EVOLVED) == [0, SCHEMA]
    assert any_redis.xlen(key("t", "delta")) == 1


def test_evolution_is_a_compare_and_set(any_redis):
    append(any_redis, "t", PAYLOAD, 3, SCHEMA)
    assert append(any_redis, "t", PAYLOAD, 3, EVOLVED, evolves_from=SCHEMA)[0] == 1
    assert any_redis.get(key("t", "schema")) == EVOLVED
    # a second producer evolving from the schema it saw, now stale, is refused
    other = wire.canonical_schema(BASE.append(pa.field("other", pa.int8())))
    assert append(any_redis, "t", PAYLOAD, 3, other, evolves_from=SCHEMA) == [0, EVOLVED]
    assert any_redis.get(key("t", "schema")) == EVOLVED


def test_backpressure_needs_pending_bytes_over_the_limit_and_another_entry(any_redis):
    append(any_redis, "t", PAYLOAD, 3, SCHEMA)
    # over the limit: refused while the delta holds another entry
    assert append(any_redis, "t", PAYLOAD, 3, SCHEMA, max_pending_bytes=1) == \
        [2, len(PAYLOAD)]
    assert any_redis.hget(key("t", "stats"), "backpressure") == b"1"
    # counters over the limit with an empty delta (e.g. counted entries trimmed meanwhile):
    # accepted, so that a table can never be blocked by its counter alone
    any_redis.xtrim(key("t", "delta"), maxlen=0)
    assert append(any_redis, "t", PAYLOAD, 3, SCHEMA, max_pending_bytes=1)[0] == 1
    # 0 turns the limit off
    assert append(any_redis, "t", PAYLOAD, 3, SCHEMA, max_pending_bytes=0)[0] == 1


def test_a_table_that_needs_a_later_protocol_refuses(any_redis):
    any_redis.set(key("t", "protocol"), 2)
    assert append(any_redis, "t", PAYLOAD, 3, SCHEMA) == [4, 2]
    assert append(any_redis, "t", PAYLOAD, 3, SCHEMA, protocol=2)[0] == 1
    assert any_redis.xlen(key("t", "delta")) == 1


@pytest.mark.parametrize("args", [
    ["schema-only"],
    [SCHEMA, "many", 3, b"", 0, "", 120, "deltaflush:append", 1],
    [SCHEMA, len(PAYLOAD), 3, b"", "-1", "", 120, "deltaflush:append", 1],
    [SCHEMA, len(PAYLOAD), 3, b"", 0, "", 0, "deltaflush:append", 1],
    [SCHEMA, len(PAYLOAD), 3, b"", 0, "", 120, "deltaflush:append", "one"],
], ids=["too-few", "bytes-not-a-count", "negative-limit", "no-dedup-window", "bad-protocol"])
def test_bad_arguments_are_an_error_and_leave_no_entry(any_redis, args):
    """An error after the XADD cannot undo it; the script takes the entry out first."""
    pipe = any_redis.pipeline(transaction=True)
    pipe.xadd(key("t", "delta"), {"arrow": PAYLOAD, "rows": 3, "batch": "b"})
    keys = [key("t", k) for k in ("schema", "delta", "pending", "stats", "batch:b", "dead",
                                  "protocol")]
    pipe.eval(CHECK, len(keys), *keys, *args)
    _, reply = pipe.execute(raise_on_error=False)
    assert isinstance(reply, Exception) and "BADARGS" in str(reply)
    assert any_redis.xlen(key("t", "delta")) == 0
    assert not any_redis.exists(key("t", "schema"), key("t", "pending"))


def _f(type_: str, children: str = "", name: str = "a", nullable: str = "true") -> str:
    return (f'{{"children":[{children}],"name":"{name}","nullable":{nullable},'
            f'"type":"{type_}"}}')


#: Schemas no flusher could read: the check must never store one (a table whose schema no
#: flusher can read could not be flushed at all).
BAD_SCHEMAS = [
    "", "[]", "{}", "[1]", "null", '"x"', "not json", f"[{_f('l')}] trailing",
    '[{"name":"a"}]', f"[{_f('q')}]", f"[{_f('tss')}]", f"[{_f('tDx')}]",
    f"[{_f('d:0,1')}]", f"[{_f('d:39,2')}]", f"[{_f('d:10,2,128')}]", f"[{_f('d:10,02')}]",
    f"[{_f('d:10,2,16')}]", f"[{_f('d:77,2,256')}]", f"[{_f('d:10,2,32')}]",
    f"[{_f('d:19,2,64')}]", f"[{_f('w:0')}]", f"[{_f('w:01')}]", f"[{_f('w:2147483648')}]",
    f"[{_f('+l')}]", f"[{_f('+l', _f('l') + ',' + _f('l', name='b'))}]",
    f"[{_f('l', _f('l'))}]", f"[{_f('+m', _f('l'))}]", f"[{_f('+m', _f('+s', _f('u')))}]",
    f"[{_f('+w:0', _f('l'))}]", "[" + _f("l", nullable='"yes"') + "]",
    f"[{_f('l', nullable='null')}]", '[{"children":[],"name":1,"nullable":true,"type":"l"}]',
    '[{"children":{"x":' + _f("l") + '},"name":"a","nullable":true,"type":"+s"}]',
    f"[{_f('l')},{_f('u')}]",  # two fields named "a"
    f"[{_f('+s', _f('l', name='x') + ',' + _f('u', name='x'))}]",
]
GOOD_SCHEMAS = [
    f"[{_f('d:76,2,256')}]", f"[{_f('d:9,-2,32')}]", f"[{_f('d:18,0,64')}]",
    f"[{_f('d:38,40')}]", f"[{_f('w:2147483647')}]", f"[{_f('tsn:')}]",
    f"[{_f('tsu:Europe/Paris')}]", f"[{_f('+s')}]",
    '[{"children":{},"name":"a","nullable":true,"type":"+s"}]',
    '[ {"type": "l", "nullable": false, "name": "a", "children": []} ]',
    f"[{_f('+m', _f('+s', _f('u', name='k') + ',' + _f('l', name='v')))}]",
    f"[{_f('+w:3', _f('+L', _f('e')))}]",
]


def _check_accepts(client, schema: str) -> bool:
    try:
        verdict = append(client, "t", PAYLOAD, 3, schema)
    except Exception as exc:  # the error reply of the script, raised by redis-py
        assert "BADSCHEMA" in str(exc), exc
        assert client.xlen(key("t", "delta")) == 0 and not client.exists(key("t", "schema"))
        return False
    assert verdict[0] == 1
    return True


@pytest.mark.parametrize("schema", BAD_SCHEMAS)
def test_a_schema_no_flusher_can_read_is_never_stored(any_redis, schema):
    assert not _check_accepts(any_redis, schema)


@pytest.mark.parametrize("schema", GOOD_SCHEMAS)
def test_a_schema_the_check_stores_is_one_the_flusher_reads(any_redis, schema):
    assert _check_accepts(any_redis, schema)
    wire.schema_from_canonical(any_redis.get(key("t", "schema")))
