"""A chunk of a stream's entries, by column: their IDs, ``arrow`` fields and ``rows`` fields.

The reader needs nothing else of an entry. Building these three lists straight from Redis's
XRANGE reply (``from_reply``) skips what redis-py does with it otherwise: a tuple and a
dict per entry, about half of XRANGE's whole cost for one-row entries. An entry's fields
arrive as a flat list, ``[name, value, name, value, ...]``; the producers of this project
write ``arrow``, ``rows``, ``batch`` in that order, which is read by position. Any other
list (another producer's order, other fields, a field written twice) is read as redis-py
reads it, a dict where the last value of a name wins, so both ways give the same fields.
IDs stay bytes until one is needed (``id``).
"""

from __future__ import annotations

from collections.abc import Sequence

from producer import wire

_LAYOUT = (wire.FIELD_ARROW, wire.FIELD_ROWS, wire.FIELD_BATCH)


class Chunk:
    """Entries ``ids`` with their ``payloads`` (``arrow`` field) and ``rows`` fields, None
    where an entry has no such field."""

    __slots__ = ("ids", "payloads", "rows")

    def __init__(self, ids: Sequence[bytes | str], payloads: list[bytes | None],
                 rows: list[bytes | None]) -> None:
        self.ids = ids
        self.payloads = payloads
        self.rows = rows

    def __len__(self) -> int:
        return len(self.ids)

    def id(self, n: int) -> str:
        entry_id = self.ids[n]
        return entry_id if isinstance(entry_id, str) else entry_id.decode()

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[str, dict[bytes, bytes]]]) -> Chunk:
        """From entries as redis-py gives them, ``(id, fields)``."""
        return cls([entry_id for entry_id, _ in entries],
                   [fields.get(wire.FIELD_ARROW) for _, fields in entries],
                   [fields.get(wire.FIELD_ROWS) for _, fields in entries])

    @classmethod
    def from_reply(cls, reply: Sequence[Sequence[object]]) -> Chunk:
        """From a raw XRANGE reply, ``[[id, [name, value, ...]], ...]`` (see the module doc)."""
        ids = [entry[0] for entry in reply]
        flat: list[list[bytes]] = [entry[1] for entry in reply]  # type: ignore[misc]
        arrow, rows_, batch = _LAYOUT
        if all(len(f) == 6 and f[0] == arrow and f[2] == rows_ and f[4] == batch
               for f in flat):
            return cls(ids, [f[1] for f in flat], [f[3] for f in flat])  # type: ignore[arg-type]
        payloads: list[bytes | None] = []
        rows: list[bytes | None] = []
        for f in flat:
            fields = dict(zip(f[::2], f[1::2], strict=False))
            payloads.append(fields.get(arrow))
            rows.append(fields.get(rows_))
        return cls(ids, payloads, rows)  # type: ignore[arg-type]
