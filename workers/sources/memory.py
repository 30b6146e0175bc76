"""A range source held in memory, for fast protocol tests (with ``sinks.memory``).

It keeps the rules of the Redis stream: one lease at a time with growing fencing tokens,
a claim and a commit that check the token, and a commit that trims only a claimed range
that starts at the head. ``expire_lease()`` stands for a lease running out while its
holder is frozen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pyarrow as pa

from producer import wire
from producer.errors import ClaimMismatch, LeaseLost, NotAtHead

from . import Claim, Lease, Range, Tally
from .reading import EntryReader


class MemoryLease:
    """A lease on a ``MemoryStream``: a token, valid until the stream hands out another."""

    def __init__(self, stream: MemoryStream, token: int) -> None:
        self.stream = stream
        self.token = token

    def __enter__(self) -> MemoryLease:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.stream.lock:
            if self.stream.lease_token == self.token:
                self.stream.lease_token = None

    def held(self) -> bool:
        return self.stream.lease_token == self.token

    def check(self) -> None:
        if not self.held():
            raise LeaseLost(f"lost the lease on table {self.stream.table!r}")


class MemoryStream:
    """See the module doc. Thread-safe."""

    def __init__(self, table: str, stream: str | None = None) -> None:
        self.table = table
        self.stream = stream or table
        self.lock = threading.RLock()
        self.entries: list[tuple[str, dict[bytes, bytes]]] = []
        self.dead: list[tuple[str, dict[bytes, bytes]]] = []
        self.schema: pa.Schema | None = None
        self.table_config = ""
        self.claim: Claim | None = None
        self.lease_token: int | None = None
        self.tokens = 0
        self.stuck_reason: str | None = None
        self.committed_rows = 0
        self._ms = 1

    def append(self, data: pa.Table, fields: dict[bytes, bytes] | None = None) -> str:
        """Add an entry (``data`` encoded as a payload, or raw ``fields``); its ID."""
        with self.lock:
            entry_id = f"{self._ms}-0"
            self._ms += 1
            if fields is None:
                fields = {wire.FIELD_ARROW: wire.encode_batches(data.schema, data.to_batches()),
                          wire.FIELD_ROWS: str(data.num_rows).encode()}
                self.schema = self.schema or data.schema
            self.entries.append((entry_id, fields))
            return entry_id

    def expire_lease(self) -> None:
        with self.lock:
            self.lease_token = None

    # --- the RangeSource protocol -----------------------------------------------------

    def lease(self, lease_ms: int) -> MemoryLease | None:
        with self.lock:
            if self.lease_token is not None:
                return None
            self.tokens += 1
            self.lease_token = self.tokens
            return MemoryLease(self, self.tokens)

    def load_claim(self) -> Claim | None:
        return self.claim

    def config(self) -> str:
        return self.table_config

    def pin_config(self, expected: str, pinned: str) -> str:
        with self.lock:
            if self.table_config == expected:
                self.table_config = pinned
            return self.table_config

    def read(self, start: Claim | str | None, max_bytes: int) -> EntryReader:
        with self.lock:
            entries = list(self.entries)
        if isinstance(start, Claim):
            if entries and entries[0][0] != start.first:
                raise NotAtHead(f"table {self.table!r}: NOTHEAD the stream starts at "
                                f"{entries[0][0]}")
            chosen = [e for e in entries if _between(e[0], start.first, start.last)]
            schema = wire.deserialize_schema(start.schema) if start.schema else None
            return EntryReader(self.table, self.stream, _chunks(chosen), start, schema,
                               start.config, max_bytes, lambda _: None)
        after = [e for e in entries if start is None or wire.parse_id(e[0]) >
                 wire.parse_id(start)]
        return EntryReader(self.table, self.stream, _chunks(after), None, self.schema,
                           self.table_config, max_bytes, self._evolved)

    def _evolved(self, schema: pa.Schema | None) -> pa.Schema | None:
        current = self.schema
        return None if current is None or (schema is not None and current.equals(schema)) \
            else current

    def record_claim(self, lease: Lease, rng: Range) -> None:
        with self.lock:
            lease.check()
            if self.claim is not None:
                raise ClaimMismatch(f"table {self.table!r}: CLAIMED a claim exists already")
            self.claim = rng.claim

    def commit(self, lease: Lease, rng: Range, tally: Tally) -> int:
        with self.lock:
            lease.check()
            if self.claim is None or (self.claim.first, self.claim.last) != (rng.first,
                                                                             rng.last):
                raise ClaimMismatch(f"table {self.table!r}: NOCLAIM the claim is not the "
                                    f"range {rng.first}..{rng.last}")
            if self.entries and self.entries[0][0] != rng.first:
                raise NotAtHead(f"table {self.table!r}: NOTHEAD the stream starts at "
                                f"{self.entries[0][0]}")
            dead = dict(rng.dead)
            kept = []
            trimmed = 0
            for entry_id, fields in self.entries:
                if wire.parse_id(entry_id) > wire.parse_id(rng.last):
                    kept.append((entry_id, fields))
                    continue
                trimmed += 1
                if entry_id in dead:
                    self.dead.append((entry_id, {**fields, wire.FIELD_ERROR:
                                                 dead[entry_id].encode()}))
            self.entries = kept
            self.claim = None
            self.committed_rows += tally.rows
            return trimmed

    def pending(self) -> bool:
        return bool(self.entries)

    def stuck(self) -> str | None:
        return self.stuck_reason

    def mark_stuck(self, reason: str) -> None:
        self.stuck_reason = reason


def _between(entry_id: str, first: str, last: str) -> bool:
    return wire.parse_id(first) <= wire.parse_id(entry_id) <= wire.parse_id(last)


def _chunks(entries: list[tuple[str, dict[bytes, bytes]]], size: int = 16
            ) -> Iterator[list[tuple[str, dict[bytes, bytes]]]]:
    for i in range(0, len(entries), size):
        yield entries[i:i + size]
