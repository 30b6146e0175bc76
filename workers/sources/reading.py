"""Turning a stream's raw entries into the data of one range: decode, validate, conform.

Shared by every range source: it sees chunks of entries (``entries.Chunk``, or lists of
``(id, fields)``) and does not know where they come from. Each entry is decoded and fully
validated (``producer.wire.decode_payload``) and cast to the range's schema; an entry that
cannot be (garbage, truncated, no ``arrow`` field, a schema that cannot be cast) is set
aside as a dead letter with the reason, never failing the flush. Runs of small entries
that share their schema message are decoded together first (``runs``: the same rows, or
the run is decoded entry by entry after all).

A new range is written in the table's current schema. If an entry does not fit because
the table's schema evolved while the range was being read, the range switches to the new
schema when nothing was yielded yet, and otherwise ends before that entry (the next range
starts with the new schema). A resumed claim uses the schema it recorded, so its rewrite is
identical, and must read back exactly its ``count`` entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa

from producer import wire
from producer.decoding import decode, fit
from producer.errors import ClaimMismatch
from producer.tablecfg import TableConfig

from . import Claim, Range
from .entries import Chunk
from .runs import decode_run, dictionary_free, runs

#: Entries as a source hands them over: chunks, each a ``Chunk`` or a list of ``(id, fields)``.
Chunks = Iterator[Chunk | list[tuple[str, dict[bytes, bytes]]]]


class EntryReader:
    """A ``RangeReader`` over ``chunks`` of raw entries (see the module doc).

    ``claim``: the claimed range being resumed, or None for a new range; ``schema`` the
    schema to write in (the claim's, or the table's current one; None before the first
    append); ``evolved()`` returns the table's schema if it changed since (new ranges only).
    """

    def __init__(self, table: str, stream: str, chunks: Chunks, claim: Claim | None,
                 schema: pa.Schema | None, config: str, max_bytes: int,
                 evolved: Callable[[pa.Schema | None], pa.Schema | None],
                 close: Callable[[], None] = lambda: None) -> None:
        self.table = table
        self.stream = stream
        self.schema = schema
        self.config = config
        parsed = TableConfig.from_json(config)
        self._spark = parsed.spark_compatible
        #: the table's format, pinned before its first range is read (``Flusher``)
        self._format = parsed.format
        self.first: str | None = None
        self._chunks = chunks
        self._claim = claim
        self._max_bytes = max_bytes
        self._evolved = evolved
        self._close = close
        self._last = ""
        self._count = 0
        self._dead: list[tuple[str, str]] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._bytes = 0
        self._yielded = False
        self._prefixes: dict[bytes, bool] = {}

    def __iter__(self) -> Iterator[pa.Table]:
        for chunk in self._chunks:
            if not isinstance(chunk, Chunk):
                chunk = Chunk.from_entries(chunk)
            good: list[pa.Table] = []
            done = False
            payloads, rows = chunk.payloads, chunk.rows
            for start, end, prefix in runs(payloads, rows):
                if prefix is not None and self._runnable(prefix):
                    table = self._decode_run(prefix, payloads[start:end], rows[start:end])
                    if table is not None:
                        self._take_run(chunk.id(start), chunk.id(end - 1), end - start,
                                       table.num_rows, payloads[start:end])
                        good.append(table)
                        continue
                for n in range(start, end):
                    entry_id = chunk.id(n)
                    payload = payloads[n]
                    batch, error, newer = self._decode(payload)
                    if newer is not None:  # fits only the table's schema as it is now
                        if self._yielded or good:
                            done = True  # the range ends before this entry
                            break
                        self.schema = newer
                    self._take(entry_id, rows[n], payload)
                    if batch is None:
                        self._dead.append((entry_id, error or "undecodable"))
                        continue
                    if self.schema is None:
                        self.schema = batch.schema
                    good.append(batch)
                    self._bytes += batch.nbytes
                    if self._claim is None and self._bytes >= self._max_bytes:
                        done = True
                        break
                if done:
                    break
            if good:
                self._yielded = True
                yield good[0] if len(good) == 1 else pa.concat_tables(good)
            if done:
                return

    def _runnable(self, prefix: bytes) -> bool:
        """Whether entries starting with the schema message ``prefix`` may be decoded as a
        run (no dictionary columns, see ``runs``); remembered per prefix."""
        known = self._prefixes.get(prefix)
        if known is None:
            try:
                known = dictionary_free(pa.ipc.read_schema(pa.py_buffer(prefix)))
            except (pa.ArrowException, OSError, ValueError):
                known = False
            self._prefixes[prefix] = known
        return known

    def _decode_run(self, prefix: bytes, payloads: list[bytes | None],
                    rows: list[bytes | None]) -> pa.Table | None:
        """A run decoded at once and brought to the range's schema, or None if its entries
        must be decoded one by one: it does not decode whole, needs the table's evolved
        schema, or would cross the range's size limit (where the range ends is decided
        entry by entry)."""
        table = decode_run(prefix, payloads, rows)  # type: ignore[arg-type]
        if table is None:
            return None
        try:
            table = fit(table, self.schema, self.table, self._spark, self._format)
        except ValueError:
            return None
        if self._claim is None and self._bytes + table.nbytes >= self._max_bytes:
            return None
        if self.schema is None:
            self.schema = table.schema
        self._bytes += table.nbytes
        return table

    def _decode(self, payload: bytes | None
                ) -> tuple[pa.Table | None, str | None, pa.Schema | None]:
        """``(table, None, None)``, or ``(table, None, newer schema)`` if it decodes only in
        the table's evolved schema, or ``(None, why, None)`` for a dead letter."""
        try:
            return (decode(payload, self.schema, self.table, self._spark, self._format),
                    None, None)
        except ValueError as exc:
            newer = self._evolved(self.schema) if self._claim is None else None
            if newer is not None:
                try:
                    return decode(payload, newer, self.table, self._spark,
                                  self._format), None, newer
                except ValueError:
                    pass
            return None, str(exc), None

    def _take(self, entry_id: str, rows: bytes | None, payload: bytes | None) -> None:
        if self.first is None:
            self.first = entry_id
        self._last = entry_id
        self._count += 1
        # a ``rows`` that is not a count was never counted in (the append check refuses it):
        # an entry written around the check, by a faulty producer, which must not fail the
        # flush
        if rows is not None and payload is not None and (not rows or rows.isdigit()):
            self._pending_rows += int(rows or 0)
            self._pending_bytes += len(payload)

    def _take_run(self, first: str, last: str, count: int, rows: int,
                  payloads: list[bytes | None]) -> None:
        """``_take`` for a run of ``count`` entries, ``first..last``, of ``rows`` rows."""
        if self.first is None:
            self.first = first
        self._last = last
        self._count += count
        self._pending_rows += rows
        self._pending_bytes += sum(map(len, payloads))  # type: ignore[arg-type]

    def range(self) -> Range | None:
        claim = self._claim
        if self.first is None:
            if claim is not None:
                raise ClaimMismatch(f"claimed range {claim.first}..{claim.last} of "
                                    f"{self.table!r} is gone from the delta")
            return None
        if claim is not None and (self._count, self.first, self._last) != (
                claim.count, claim.first, claim.last):
            raise ClaimMismatch(f"read {self._count} entries {self.first}..{self._last} of the "
                                f"{claim.count} claimed ({claim.first}..{claim.last}) of "
                                f"{self.table!r}")
        return Range(
            table=self.table, stream=self.stream, first=self.first, last=self._last,
            count=self._count,
            schema=wire.canonical_schema(self.schema) if self.schema is not None else b"",
            config=self.config, dead=tuple(self._dead), pending_rows=self._pending_rows,
            pending_bytes=self._pending_bytes, resumed=claim is not None)

    def close(self) -> None:
        self._close()
