"""Drain tables into their sinks: the protocol of ``workers.protocol``, pipelined. No Celery.

A flush of table ``T`` takes the lease of ``T``'s stream and runs the protocol range after
range until the stream is empty, its time budget is spent or it is asked to stop. Three
threads share the work, each bounded:

* this thread reads and decodes a range and writes it into staged files (steps 1-2); the
  source fetches the next ``XRANGE`` chunk in the background meanwhile;
* the encoder thread (``writer.Encoder``) encodes row groups, one at a time, so memory holds
  about two row groups whatever the file size;
* the committer thread takes each written range through steps 3-5, in order, starting a
  range only once the one before it is committed.

So while one range is recorded, published and committed, the next one is read, from just
after it; no further (memory stays bounded, and a stop request ends the flush after at most
that one range more), and not at all for a sorted table, whose files are held whole until
written. Claims and commits still come one at a time, in order, each at the head of the
stream; what runs ahead only reads, and stops as soon as the range before it fails.

A range whose state breaks an invariant of the protocol (``InvariantViolation``) while this
flusher holds the lease marks the table stuck: no flush runs until an operator clears it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from producer import shards, wire
from producer.errors import InvariantViolation, LeaseLost
from producer.settings import Settings
from producer.tablecfg import TableConfig

from . import sinks
from .failpoints import failpoint
from .maintenance import LAKE_FORMATS, record_commit
from .protocol import Done, Written, commit_range, write_range
from .sinks import Sink
from .sinks.folder import file_name
from .sources import Claim, Lease, RangeSource
from .sources.redis_stream import RedisStream
from .storage import Storage
from .writer import Encoder

__all__ = ["FlushResult", "Flusher", "file_name"]

log = logging.getLogger(__name__)


@dataclass
class FlushResult:
    """What one flush did; ``as_dict()`` is the task's JSON result, shown by Flower."""

    table: str
    status: str = "ok"  # ok | empty | busy | fenced | stuck
    #: the shard flushed (0: the table's own stream); None for a flush of every shard
    shard: int | None = 0
    rows: int = 0
    files: int = 0
    bytes: int = 0
    arrow_bytes: int = 0
    dead: int = 0
    first_id: str | None = None
    last_id: str | None = None
    seconds: float = 0.0
    more: bool = False
    paths: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, done: Done) -> None:
        rng = done.range
        self.rows += done.staged.rows
        self.bytes += done.staged.file_bytes
        self.arrow_bytes += done.staged.arrow_bytes
        self.dead += len(rng.dead)
        self.first_id = self.first_id or rng.first
        self.last_id = rng.last
        self.files += len(done.committed.paths)
        self.paths.extend(done.committed.paths)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, other: FlushResult) -> None:
        """Add a flush of another shard of the table (``flush_shards``)."""
        for name in ("rows", "files", "bytes", "arrow_bytes", "dead"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.paths.extend(other.paths)
        self.more = self.more or other.more
        self.first_id = self.first_id or other.first_id
        self.last_id = other.last_id or self.last_id
        if other.status not in ("ok", "empty") or self.status == "empty":
            self.status, self.error = other.status, other.error or self.error


class Flusher:
    """Flushes tables from one Redis to their sinks. One per process; thread-safe.

    ``sink`` sends every table to that sink (tests: ``sinks.memory.MemorySink``); by
    default a table goes to the sink of its format on ``storage``. ``source(table)`` makes
    a table's range source (default: its delta stream in ``client``).
    """

    def __init__(self, client: redis.Redis, storage: Storage, settings: Settings, *,
                 sink: Sink | None = None,
                 source: Callable[[str], RangeSource] | None = None) -> None:
        self.redis = client
        self.storage = storage
        self.settings = settings
        self._sink = sink
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._source = source or (
            lambda table: RedisStream(client, wire.Keys(settings.key_prefix, table),
                                      settings.append_replicas,
                                      settings.append_replicas_timeout_ms))

    def sink_for(self, config: TableConfig) -> Sink:
        """The sink of a table with ``config`` (one per format, made on first use)."""
        if self._sink is not None:
            return self._sink
        fmt = config.format or self.settings.table_format
        with self._lock:
            if fmt not in self._sinks:
                self._sinks[fmt] = sinks.for_format(fmt, self.storage, self.settings)
            return self._sinks[fmt]

    def flush_shards(self, table: str, budget_s: float | None = None,
                     stop: Callable[[], bool] | None = None) -> FlushResult:
        """``flush`` every shard of ``table`` in turn (just the table, if never sharded),
        skipping those another flusher holds; one summary of them all (``shard`` None for
        a sharded table)."""
        started = time.monotonic()
        count = shards.shards_ever(self.redis, self.settings.key_prefix, table)
        result = FlushResult(table, status="empty", shard=None if count > 1 else 0)
        for shard in range(count):
            left = None if budget_s is None else budget_s - (time.monotonic() - started)
            result.merge(self.flush(table, left, stop, shard=shard))
        result.seconds = round(time.monotonic() - started, 3)
        return result

    def flush(self, table: str, budget_s: float | None = None,
              stop: Callable[[], bool] | None = None, shard: int = 0) -> FlushResult:
        """Drain ``table`` (its shard ``shard``) until its stream is empty, ``budget_s`` is
        spent or ``stop()`` says so (checked between ranges, e.g. when the worker shuts
        down).

        Returns ``status="busy"`` without doing anything if another flusher holds the
        table, ``"stuck"`` if the table is marked stuck (``error`` says why). Raises
        ``LeaseLost`` if this flusher was fenced (nothing of its is committed then), and
        storage or Redis errors as they come (nothing is trimmed then; the next flush
        resumes).
        """
        started = time.monotonic()
        source = self._source(table) if shard == 0 else \
            RedisStream(self.redis, wire.Keys(self.settings.key_prefix, table, shard))
        result = FlushResult(table, shard=shard)
        name = source.stream
        reason = source.stuck()
        if reason is not None:
            log.warning("table %s is stuck and was not flushed (`deltaflush table unstick "
                        "%s` once the cause is fixed): %s", name, table, reason)
            result.status, result.error = "stuck", reason
            return result
        lease = source.lease(self.settings.lease_ms)
        if lease is None:
            result.status = "busy"
            return result
        with lease:
            try:
                self._drain(source, lease, result, started, budget_s, stop)
            except InvariantViolation as exc:
                if not lease.held():  # a zombie's read of a range committed meanwhile
                    raise LeaseLost(f"lost the lease on table {name!r}: {exc}") from exc
                source.mark_stuck(str(exc))
                log.warning("table %s is stuck, no flush runs until `deltaflush table "
                            "unstick %s`: %s", name, table, exc)
                result.status, result.error = "stuck", str(exc)
        if result.more:
            result.more = source.pending()
        if result.first_id is None and result.status == "ok":
            result.status = "empty"
        result.seconds = round(time.monotonic() - started, 3)
        if result.first_id is not None:
            log.info(
                "flushed table=%s rows=%d files=%d bytes=%d dead=%d ids=%s..%s seconds=%.3f",
                name, result.rows, result.files, result.bytes, result.dead,
                result.first_id, result.last_id, result.seconds,
            )
        return result

    def _drain(self, source: RangeSource, lease: Lease, result: FlushResult, started: float,
               budget_s: float | None, stop: Callable[[], bool] | None) -> None:
        """Write ranges on this thread and commit them on the committer thread, one range
        ahead at most (see the module doc)."""
        failpoint("flush.leased")
        sink = self.sink_for(self._pinned_config(source))
        start: Claim | str | None = source.load_claim()
        finishing: list[Future[Done]] = []
        with Encoder() as encoder, \
                ThreadPoolExecutor(1, thread_name_prefix="flush-commit") as committer:
            try:
                while True:
                    before = finishing[-1] if finishing else None
                    range_started = time.monotonic()
                    written = write_range(source, sink, lease, start,
                                          self.settings.max_file_bytes, encoder,
                                          ahead=isinstance(start, str),
                                          check=_raise_if_failed(before))
                    if written is None:
                        break
                    finishing.append(committer.submit(
                        self._commit, source, sink, lease, written, range_started, before))
                    start = written.range.last
                    if TableConfig.from_json(written.range.config).sort_by:
                        finishing[-1].result()  # a sorted file is held whole: none ahead
                    elif len(finishing) > 1:  # one range is read ahead, no more
                        finishing[-2].result()
                    if (budget_s is not None and time.monotonic() - started > budget_s) or (
                            stop is not None and stop()):
                        result.more = True
                        break
            finally:
                for done in finishing:
                    result.add(done.result())  # the first failure raises

    def _pinned_config(self, source: RangeSource) -> TableConfig:
        """The table's configuration, its format pinned at its first flush (to the default
        format of this worker, ``DELTAFLUSH_TABLE_FORMAT``) so that later flushes keep it
        whatever the workers' settings become."""
        raw = source.config()
        config = TableConfig.from_json(raw)
        if config.format is None:
            config = TableConfig.from_json(source.pin_config(
                raw, config.with_format(self.settings.table_format).to_json()))
        return config

    def _commit(self, source: RangeSource, sink: Sink, lease: Lease, written: Written,
                started: float, before: Future[Done] | None) -> Done:
        """Steps 3-5 of ``written``, once the range before it is committed."""
        try:
            if before is not None:
                before.result()  # raises if the range before failed: then stop here too
        except BaseException:
            if written.staging is not None:
                written.staging.abort()
            raise
        done = commit_range(source, sink, lease, written, started)
        if self.redis is not None and sink.format in LAKE_FORMATS:
            try:  # counters only: the range is committed and trimmed either way
                record_commit(self.redis, wire.Keys(self.settings.key_prefix, source.table),
                              done, sink.format, self.settings.max_file_bytes)
            except redis.RedisError as exc:
                log.warning("could not count a lake commit of %s: %s", source.table, exc)
        if done.range.dead:
            log.warning("table %s: %d entries could not be flushed and went to the dead "
                        "letters (`deltaflush dead list %s`), e.g. %s: %s", source.table,
                        len(done.range.dead), source.table, *done.range.dead[0])
        return done


def _raise_if_failed(before: Future[Done] | None) -> Callable[[], None]:
    """A check that raises the error of the range ``before`` once it failed."""
    def check() -> None:
        if before is not None and before.done():
            error = before.exception()
            if error is not None:
                raise error
    return check
