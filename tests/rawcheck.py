"""An append exactly as docs/spec.md describes it, with no code of the Python producer: the
check script read from its file, KEYS and ARGV in the spec's order. What a producer in any
other language sends; the tests use it to hold the spec and the script to each other."""

from __future__ import annotations

import uuid
from typing import Any

import redis

from tests.conftest import ROOT

CHECK = (ROOT / "producer" / "lua" / "append_check.lua").read_text()
PREFIX = "deltaflush"


def key(table: str, suffix: str) -> str:
    return f"{PREFIX}:{{{table}}}:{suffix}"


def append(client: redis.Redis, table: str, payload: bytes, rows: int, schema: bytes | str,
           evolves_from: bytes | str = b"", max_pending_bytes: int = 0,
           batch_id: str | None = None, protocol: int = 1) -> list[Any]:
    """Register the table, then MULTI / XADD / EVAL append_check.lua / EXEC; return the
    check's reply."""
    batch_id = batch_id or uuid.uuid4().hex
    client.sadd(f"{PREFIX}:tables", table)
    pipe = client.pipeline(transaction=True)
    pipe.xadd(key(table, "delta"), {"arrow": payload, "rows": rows, "batch": batch_id})
    pipe.eval(CHECK, 7,
              key(table, "schema"), key(table, "delta"), key(table, "pending"),
              key(table, "stats"), key(table, f"batch:{batch_id}"), key(table, "dead"),
              key(table, "protocol"),
              schema, len(payload), rows, evolves_from, max_pending_bytes, "", 120,
              "deltaflush:append", protocol)
    _, verdict = pipe.execute()
    return list(verdict)
