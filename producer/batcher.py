"""A batching producer for event-at-a-time applications: ``Producer.batcher()``.

Application threads hand over rows (dicts) or small batches with ``write``; a background
thread merges them per table and appends each merged batch with ``Producer.append`` once it
holds ``max_rows`` rows, about ``max_bytes`` bytes, or has waited ``linger_ms``, whichever
comes first (Kafka's ``batch.size`` and ``linger.ms``). Each ``write`` returns a
``concurrent.futures.Future`` that resolves to the entry ID of the merged batch that holds
it once Redis has accepted that batch, or raises the append's error.

Delivery keeps ``append``'s guarantees, per merged batch: one batch ID, so a retried append
(a lost connection) is never added twice; nothing of a refused batch is written. So a
resolved future means the row is in Redis exactly once, and a failed one means it is not
there at all; a row whose future had not resolved when its process died may be in Redis or
not (the same as an ``append`` that had not returned).

* Merging never mixes shapes: rows are grouped by table, column names and Python value
  types (Arrow batches by schema) before they are merged, so a row merged with others gets
  the types it would get alone. If a merged batch is refused as invalid (``InvalidInput``:
  a schema conflict, a type no reader takes, too large), it is split in halves and each
  half appended again, down to single writes: only the writes at fault fail.
* Backpressure reaches the caller: a batch refused with ``Backpressure`` (the table is too
  far behind) fails every future of the batch (``append_timeout_s`` makes each append wait
  that long for room first). Buffered memory is bounded by ``max_buffer_bytes``: a
  ``write`` that would pass it waits up to ``max_block_s`` for the background thread to
  send, then raises ``BufferFull`` (nothing of that write is buffered).
* ``close()`` (or leaving ``with``) sends everything buffered and waits for it. A process
  that exits with rows not yet acknowledged logs a warning with their count.
* Thread-safe: any number of threads may ``write``; one background thread appends. A
  process forked from one holding a batcher gets it empty (the parent sends what it had
  buffered; the child sending its copies would append them twice) with a thread of its
  own.

Sizes of dict rows and of Arrow writes under 1,000 rows are estimated (from the Arrow size
per row of the table's last merged batch), so ``max_bytes`` and ``max_buffer_bytes`` are
approximate for them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, PENDING
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import wire
from .convert import to_table
from .errors import BufferFull, InvalidInput, InvalidTableName

if TYPE_CHECKING:
    from .client import Producer

log = logging.getLogger(__name__)

#: Default of ``linger_ms``: how long the first row of a batch waits for others.
LINGER_MS = 5.0
#: Default of ``max_rows`` per merged batch.
MAX_ROWS = 10_000
#: Default of ``max_bytes`` (estimated Arrow bytes) per merged batch.
MAX_BYTES = 4 * 1024 * 1024
#: Default of ``max_buffer_bytes``: everything buffered and on its way, all tables.
MAX_BUFFER_BYTES = 64 * 1024 * 1024
#: Default of ``max_block_s``: how long a ``write`` waits for room in a full buffer.
MAX_BLOCK_S = 30.0
#: The size of a dict row before one of its table was measured.
FIRST_ROW_BYTES = 64


class WriteFuture(Future[Any]):
    """The future of one write. Cheap to make: the futures of one merged batch share their
    condition, and the batcher resolves them together, holding it (so no waiter wakes to a
    sibling's result and finds its own missing). A write cannot be cancelled: it may be on
    its way already. Callbacks run on the batcher's thread; they must not block."""

    _result: Any = None
    _exception: BaseException | None = None

    def __init__(self, condition: threading.Condition) -> None:
        # Future.__init__ would make a condition of its own, and two lists that few futures
        # ever use (made on first use below): fewer objects for the garbage collector
        self._condition = condition
        self._state = PENDING

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        """``concurrent.futures.wait``'s and ``as_completed``'s waiters (on first use)."""
        return self.__dict__.setdefault("_waiting", [])

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        return self.__dict__.setdefault("_callbacks", [])

    def cancel(self) -> bool:
        return False

    def _settle(self, outcome: Any) -> None:
        """``set_result``/``set_exception`` without their locking and notifying, which
        ``resolve`` does once for all the futures of a batch (the condition is held)."""
        if isinstance(outcome, BaseException):
            self._exception = outcome
        else:
            self._result = outcome
        self._state = FINISHED
        for waiter in self.__dict__.get("_waiting", ()):
            if isinstance(outcome, BaseException):
                waiter.add_exception(self)
            else:
                waiter.add_result(self)


def resolve(condition: threading.Condition, futures: Sequence[WriteFuture],
            outcomes: Sequence[Any]) -> None:
    """Resolve the futures of one batch (sharing ``condition``) at once, then run their
    callbacks."""
    with condition:
        for future, outcome in zip(futures, outcomes, strict=True):
            future._settle(outcome)
        condition.notify_all()
    for future in futures:
        if "_callbacks" in future.__dict__:
            future._invoke_callbacks()  # type: ignore[attr-defined]


@dataclass
class _Batch:
    """Writes of one table and one shape, merged into one append."""

    table: str
    #: dict rows: their column names (the shape's), else None (Arrow batches)
    names: tuple[str, ...] | None
    deadline: float
    condition: threading.Condition = field(default_factory=threading.Condition)
    items: list[Any] = field(default_factory=list)  # dict rows, or pa.Tables
    futures: list[Any] = field(default_factory=list)  # WriteFutures (asyncio's: aio)
    rows: int = 0
    nbytes: int = 0


class Buffer:
    """What both batchers (this one and ``aio.AsyncBatcher``) hold and decide: the options,
    the open batches by group, the batches ready to send, and the sizes; and the merging of
    a batch's writes. The waiting and sending are each batcher's own."""

    def __init__(self, *, linger_ms: float, max_rows: int, max_bytes: int,
                 max_buffer_bytes: int, append_timeout_s: float | None) -> None:
        for name, value in (("linger_ms", linger_ms), ("max_rows", max_rows),
                            ("max_bytes", max_bytes), ("max_buffer_bytes", max_buffer_bytes)):
            if value < 0 or (name != "linger_ms" and value == 0):
                raise ValueError(f"batcher: {name}={value!r} must be positive, e.g. "
                                 f"{name}={globals()[name.upper()]!r}")
        self.linger_s = linger_ms / 1000
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.append_timeout_s = append_timeout_s
        self._open: dict[Any, _Batch] = {}
        self._ready: list[_Batch] = []
        self._row_bytes: dict[str, float] = {}
        self._tables: set[str] = set()
        #: rows written and not yet resolved (buffered or on their way)
        self.unacknowledged = 0
        #: their estimated bytes
        self._buffered = 0
        self._closing = False
        atexit.register(_report_at_exit, weakref.ref(self))

    def _add(self, key: Any, batch: _Batch, data: Any, future: Any, rows: int,
             nbytes: int) -> bool:
        """Buffer one write in ``batch`` (the open batch of ``key``); True if that made the
        batch full, and so ready to send."""
        batch.items.append(data)
        batch.futures.append(future)
        batch.rows += rows
        batch.nbytes += nbytes
        self._buffered += nbytes
        self.unacknowledged += rows
        if batch.rows >= self.max_rows or batch.nbytes >= self.max_bytes:
            del self._open[key]
            self._ready.append(batch)
            return True
        return False

    def _take_due(self, now: float) -> float | None:
        """Move the open batches whose linger ran out by ``now`` to the ready ones; the
        nearest deadline of those still open (None if none is)."""
        for key, batch in list(self._open.items()):
            if batch.deadline <= now:
                del self._open[key]
                self._ready.append(batch)
        return min((b.deadline for b in self._open.values()), default=None)

    def estimate(self, table: str, rows: int) -> int:
        """The bytes of ``rows`` rows of ``table``, from its last merged batch."""
        return int(rows * self._row_bytes.get(table, FIRST_ROW_BYTES))

    def _merge(self, batch: _Batch, picked: Sequence[int]) -> pa.Table:
        table = merge(batch.names, [batch.items[n] for n in picked])
        if table.num_rows and len(picked) > 1:  # one chunk: measured cheaply
            self._row_bytes[batch.table] = max(1.0, table.nbytes / table.num_rows)
        return table


class Batcher(Buffer):
    """See the module doc. Made by ``Producer.batcher()``."""

    def __init__(self, producer: Producer, *, linger_ms: float = LINGER_MS,
                 max_rows: int = MAX_ROWS, max_bytes: int = MAX_BYTES,
                 max_buffer_bytes: int = MAX_BUFFER_BYTES, max_block_s: float = MAX_BLOCK_S,
                 append_timeout_s: float | None = None) -> None:
        super().__init__(linger_ms=linger_ms, max_rows=max_rows, max_bytes=max_bytes,
                         max_buffer_bytes=max_buffer_bytes, append_timeout_s=append_timeout_s)
        if max_block_s < 0:
            raise ValueError(f"batcher: max_block_s={max_block_s!r} must be >= 0, e.g. 30")
        self.producer = producer
        self.max_block_s = max_block_s
        self._start_thread()
        _LIVE.add(self)

    def _start_thread(self) -> None:
        #: guards the state; ``_lock`` is a condition on it. ``write`` takes the bare
        #: mutex (a C-level ``with``; a Condition's is Python code)
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        self._thread = threading.Thread(target=self._run, name="deltaflush-batcher",
                                        daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        """In a child process (``os.fork``: a prefork server, multiprocessing's default on
        Linux): the writes buffered belong to the parent, which sends them, and sending
        the child's copies would append them twice; so the child starts empty, with a
        background thread of its own (the parent's did not survive the fork)."""
        self._open.clear()
        self._ready.clear()
        self.unacknowledged = self._buffered = 0
        if not self._closing:
            self._start_thread()

    # --- the application's side ------------------------------------------------------

    def write(self, table: str, data: Any) -> Future[str]:
        """Buffer one row (a dict), a list of dicts, or anything ``append`` takes, for
        ``table``; return a future of the entry ID of the merged batch that holds it.

        Raises at once, buffering nothing, for an invalid table name or data that cannot
        be converted to Arrow (a list of dicts, a DataFrame: converted here), and
        ``BufferFull`` when the buffer stayed full for ``max_block_s``."""
        if type(data) is dict:  # the common case, inline: classify() does the same
            key: Any = (table, tuple(data), tuple(map(type, data.values())))
            rows, nbytes = 1, 0
        else:
            key, rows, nbytes, data = classify(table, data)
        with self._mutex:
            batch = self._open.get(key)
            if batch is None:
                batch = self._start(key, table, data)
            if not nbytes:
                nbytes = self.estimate(table, rows)
            if self._buffered + nbytes > self.max_buffer_bytes and self._buffered:
                self._wait_for_room(nbytes)
                batch = self._open.get(key) or self._start(key, table, data)
            future = WriteFuture(batch.condition)
            if self._add(key, batch, data, future, rows, nbytes):
                self._lock.notify_all()
        return future

    def _start(self, key: Any, table: str, data: Any) -> _Batch:
        if self._closing:
            raise RuntimeError("this batcher is closed; make a new one with "
                               "Producer.batcher()")
        if table not in self._tables:
            if not wire.valid_table_name(table):
                raise InvalidTableName(table)
            self._tables.add(table)
        batch = _Batch(table, names_of(key), time.monotonic() + self.linger_s)
        self._open[key] = batch
        self._lock.notify_all()  # the background thread learns the new deadline
        return batch

    def _wait_for_room(self, nbytes: int) -> None:
        deadline = time.monotonic() + self.max_block_s
        for batch in self._open.values():  # send now what could make room
            self._ready.append(batch)
        self._open.clear()
        self._lock.notify_all()
        while self._buffered and self._buffered + nbytes > self.max_buffer_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BufferFull(self._buffered, self.max_buffer_bytes, self.max_block_s)
            self._lock.wait(left)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send everything buffered now and wait until every write so far is resolved
        (True), or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            self._ready.extend(self._open.values())
            self._open.clear()
            self._lock.notify_all()
            while self.unacknowledged:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Send everything buffered, wait for it, and stop the background thread. Writes
        after ``close`` raise ``RuntimeError``."""
        self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout_s)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the background thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    nearest = self._take_due(now)
                    if self._ready or (self._closing and not self._open):
                        break
                    self._lock.wait(None if nearest is None else nearest - now)
                batches, self._ready = self._ready, []
                if not batches:
                    return  # closing, nothing left
            for batch in batches:
                self._deliver(batch)

    def _deliver(self, batch: _Batch) -> None:
        """Append one merged batch and resolve its futures, whatever happens."""
        outcomes: list[Any] = [None] * len(batch.items)
        try:
            if batch.items:  # (a batch opened by a write that then found no room is empty)
                self._append(batch, list(range(len(batch.items))), outcomes)
        except BaseException as exc:  # never leave a future unresolved
            outcomes = [exc if o is None else o for o in outcomes]
        resolve(batch.condition, batch.futures, outcomes)  # all at once: see WriteFuture
        with self._lock:
            self.unacknowledged -= batch.rows
            self._buffered -= batch.nbytes
            self._lock.notify_all()

    def _append(self, batch: _Batch, picked: Sequence[int], outcomes: list[Any]) -> None:
        """Append the writes ``picked`` of ``batch`` as one batch, setting their outcomes;
        halves again on ``InvalidInput`` so that only the writes at fault fail."""
        try:
            arrow = self._merge(batch, picked)
            entry_id: Any = self.producer.append(batch.table, arrow,
                                                 timeout_s=self.append_timeout_s)
        except InvalidInput as exc:
            if len(picked) > 1:
                for part in halves(picked):
                    self._append(batch, part, outcomes)
                return
            entry_id = exc
        except Exception as exc:  # Backpressure, SchemaRace, Redis down: the whole batch
            entry_id = exc
        for n in picked:
            outcomes[n] = entry_id


def classify(table: str, data: Any) -> tuple[Any, int, int, Any]:
    """``(group key, rows, bytes, data)`` of one write: writes of one key are merged. A dict
    row's key is its table, column names and Python value types; anything else is converted
    to Arrow now (``to_table``'s errors raise) and keyed by its table and schema. Bytes 0:
    to be estimated from the table's bytes per row (``Buffer.estimate``)."""
    if type(data) is dict:
        return (table, tuple(data), tuple(map(type, data.values()))), 1, 0, data
    arrow = to_table(data)
    rows = arrow.num_rows
    # measuring a table costs per chunk and column (~10 us): only large ones are measured,
    # small ones estimated like rows (0)
    return (table, arrow.schema), rows, arrow.get_total_buffer_size() if rows >= 1000 else 0, \
        arrow


def names_of(key: Any) -> tuple[str, ...] | None:
    """The column names of a group of dict rows (``classify``), or None for Arrow data."""
    return key[1] if isinstance(key[1], tuple) else None


def merge(names: tuple[str, ...] | None, items: list[Any]) -> pa.Table:
    """Writes of one group as one table: dict rows with column ``names``, or Arrow tables
    (``names`` None). Raises ``InvalidInput`` if they cannot be (``halves`` then finds the
    writes at fault)."""
    if names is None:  # one record batch per merged batch, not one per write
        return items[0] if len(items) == 1 else pa.concat_tables(items).combine_chunks()
    if len(items) == 1:
        return to_table(items)
    try:  # one array per column: the types pa.Table.from_pylist infers, 10x faster
        return pa.Table.from_arrays([pa.array([r[k] for r in items]) for k in names],
                                    names=list(names))
    except (pa.ArrowException, ValueError, TypeError, KeyError, OverflowError):
        return to_table(items)  # its error names the problem (or halving isolates it)


def halves(picked: Sequence[int]) -> tuple[Sequence[int], Sequence[int]]:
    """A group refused as invalid is appended again as two halves, down to single writes."""
    half = len(picked) // 2
    return picked[:half], picked[half:]


#: The batchers of this process, for the fork hook.
_LIVE: weakref.WeakSet[Batcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for batcher in list(_LIVE):
        batcher._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _report_at_exit(ref: weakref.ref[Buffer]) -> None:
    batcher = ref()
    if batcher is not None and batcher.unacknowledged:
        log.warning("deltaflush: the process exits with %d rows written to a batcher not "
                    "yet acknowledged by Redis: they may be lost. Call close() on the "
                    "batcher (or use it as a context manager) before exiting.",
                    batcher.unacknowledged)
