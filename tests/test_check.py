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
