"""Where a flush's ranges come from: the range-source seam.

A range source is one stream of entries that one flusher at a time drains (a table's
delta in Redis today; one shard of a table on a Redis Cluster next). It offers what the
protocol in ``workers.protocol`` needs, and nothing of how it stores it:

* a lease with a fencing token (``lease``), so one flusher at a time owns the stream;
* the claim a crashed flusher left (``load_claim``), and the recording of a new one
  (``record_claim``), fenced by the token;
* ``read``: a range of entries, decoded, validated and conformed to one schema, as Arrow
  tables, with the entries that cannot be flushed set aside as dead letters;
* ``commit``: trim a committed range and move its dead letters, fenced by the token;
* a stuck mark, set when the source's state breaks an invariant of the protocol.

The records that cross threads (``Claim``, ``Range``) are frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa


class Lease(Protocol):
    """A stream's lease, held by one flusher: its fencing token, a context manager that
    gives it up. ``check()`` raises ``LeaseLost`` if it is, or may be, lost (no round trip);
    ``held()`` asks the source whether the token still holds it."""

    token: int

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...

    def check(self) -> None: ...

    def held(self) -> bool: ...


@dataclass(frozen=True)
class Claim:
    """A range recorded before its files were published: ``first..last``, ``count`` entries,
    written with the stored ``schema`` and table ``config`` (JSON)."""

    first: str
    last: str
    count: int
    schema: bytes
    config: str


@dataclass(frozen=True)
class Range:
    """One range of a stream, read: what the claim records and what the commit needs.

    ``dead`` holds the ``(entry id, error)`` of entries set aside as dead letters;
    ``pending_rows``/``pending_bytes`` are what the range takes off the pending counters.
    ``resumed``: the range is a claim a previous flusher recorded.
    """

    table: str
    stream: str
    first: str
    last: str
    count: int
    schema: bytes
    config: str
    dead: tuple[tuple[str, str], ...] = ()
    pending_rows: int = 0
    pending_bytes: int = 0
    resumed: bool = False

    @property
    def claim(self) -> Claim:
        return Claim(self.first, self.last, self.count, self.schema, self.config)


@dataclass(frozen=True)
class Tally:
    """What committing a range wrote, for the stream's counters: files, their bytes, rows,
    Arrow bytes, and the seconds from reading the range to committing it."""

    files: int = 0
    file_bytes: int = 0
    rows: int = 0
    arrow_bytes: int = 0
    seconds: float = 0.0


class RangeReader(Protocol):
    """The data of one range, read as it is iterated; ``range()`` is its record after."""

    #: the schema every table yielded has (None until the first good entry)
    schema: pa.Schema | None
    #: the table configuration (JSON) the range is written with
    config: str
    #: the first entry's ID (None until one was read)
    first: str | None

    def __iter__(self) -> Iterator[pa.Table]: ...

    def range(self) -> Range | None:
        """The range read (None if the stream had nothing); raises ``ClaimMismatch`` if a
        resumed claim did not read back whole."""
        ...

    def close(self) -> None: ...


class RangeSource(Protocol):
    """One stream of one table, drained by one flusher at a time (see the module doc)."""

    table: str
    #: names this stream among the table's streams, in sink commit records
    stream: str

    def lease(self, lease_ms: int) -> Lease | None:
        """Take the stream's lease with a new fencing token, or None if another holds it."""
        ...

    def load_claim(self) -> Claim | None: ...

    def config(self) -> str:
        """The table's configuration (JSON; '' for the defaults)."""
        ...

    def pin_config(self, expected: str, pinned: str) -> str:
        """Set the table's configuration to ``pinned`` if it is still ``expected``; return
        the configuration in force afterwards."""
        ...

    def read(self, start: Claim | str | None, max_bytes: int) -> RangeReader:
        """Read the claimed range ``start`` exactly, or a new range after entry ``start``
        (from the head if None) until its data reaches ``max_bytes`` or the stream ends."""
        ...

    def record_claim(self, lease: Lease, rng: Range) -> None: ...

    def commit(self, lease: Lease, rng: Range, tally: Tally) -> int:
        """Trim ``rng``, move its dead letters and count ``tally``; return the number of
        entries trimmed."""
        ...

    def pending(self) -> bool:
        """True if the stream still holds entries."""
        ...

    def stuck(self) -> str | None:
        """Why the stream is marked stuck, or None."""
        ...

    def mark_stuck(self, reason: str) -> None: ...
