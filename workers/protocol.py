"""The flush protocol: how one range of a stream reaches a sink exactly once. Plain code.

One flusher holds the stream's lease (a fencing token, ``workers.lease``) and takes the
stream one range at a time, each range through five steps:

1. **Claim.** If the stream has a claim, a previous flusher died or was fenced mid-range:
   resume *its* claim, the exact range ``first..last`` of ``count`` entries, with the schema
   and configuration it recorded. Otherwise read entries from the head of the stream (or
   just after the range before) until their data reaches ``max_file_bytes`` or the stream
   ends; that range becomes the claim.
2. **Write** the range into staged files of the sink (temporary, invisible to readers).
   Entries are decoded and validated one by one; one that cannot be decoded or cast to the
   range's schema is set aside as a dead letter instead of failing the flush. A resumed
   claim must read back exactly its ``count`` entries, or the flush stops
   (``ClaimMismatch``).
3. **Record the claim** (new ranges only), fenced by the token. From here on the range, and
   so the content of its files, are fixed.
4. **Publish and commit** the staged files to the sink, keyed by the range: the sink makes
   this idempotent (a range it holds already changes nothing: the folder sink publishes
   files named after the range, a lake sink finds the range in its commit records).
5. **Trim**, in one script fenced by the token: move the dead letters to the stream's
   dead-letter stream, trim exactly the range from the stream, delete the claim, update the
   counters.

Why each crash is harmless:

* before 3: nothing is recorded; the staged files are garbage that nobody reads (swept
  later). The next flusher starts over from the head.
* between 3 and 5: the claim is resumed; the retry writes the same entries with the same
  schema and configuration, and its commit is a no-op if the first one reached the sink.
* after 5: the entries are gone from the stream and the sink holds them.

Why a frozen flusher (a zombie) cannot corrupt anything: once it wakes, its token is stale,
so steps 3 and 5 fail. A commit (step 4) it had not finished can only commit the claimed
range, which the sink holds at most once. A read of a range that another flusher committed
meanwhile comes back short, which stops it before it commits.

So every row reaches the sink at least once (nothing is trimmed before its range is
committed) and at most once (a range is committed once, keyed by the range, and trimmed
once, fenced): exactly once.

``write_range`` is steps 1-2 and ``commit_range`` steps 3-5; ``flush_range`` runs both.
``workers.flusher`` pipelines them (the next range is written while this one commits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from producer.tablecfg import TableConfig

from .failpoints import failpoint
from .sinks import Committed, Sink, Staged, StageStart, Staging
from .sources import Claim, Lease, Range, RangeSource, Tally
from .writer import Encoder


@dataclass(frozen=True)
class Written:
    """A range read and staged (steps 1-2), handed to ``commit_range``."""

    range: Range
    staging: Staging | None  # None when every entry of the range was a dead letter


@dataclass(frozen=True)
class Done:
    """A range through all five steps."""

    range: Range
    staged: Staged
    committed: Committed


def write_range(source: RangeSource, sink: Sink, lease: Lease, start: Claim | str | None,
                max_bytes: int, encoder: Encoder, ahead: bool = False,
                check: Callable[[], None] = lambda: None) -> Written | None:
    """Steps 1 and 2: read the claim ``start``, or a new range after entry ``start`` (from
    the head if None), into staged files. None if the stream has nothing to read.
    ``check()`` runs before each piece is written; what it raises stops the range."""
    reader = source.read(start, max_bytes)
    staging: Staging | None = None
    try:
        for data in reader:
            check()
            if staging is None:
                assert reader.schema is not None and reader.first is not None
                staging = sink.stage(StageStart(
                    source.table, reader.first, lease.token, reader.schema,
                    TableConfig.from_json(reader.config), encoder, ahead, source.stream))
                staging.write(data)
                failpoint("flush.first_chunk")
            else:
                staging.write(data)
        rng = reader.range()
        if rng is None:
            return None
        if staging is not None:
            staging.seal()
        return Written(rng, staging)
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    finally:
        reader.close()


def commit_range(source: RangeSource, sink: Sink, lease: Lease, written: Written,
                 started: float | None = None) -> Done:
    """Steps 3, 4 and 5 for a written range (``started``: when it began to be read, on the
    ``time.monotonic`` clock, for the flush duration metric)."""
    rng = written.range
    try:
        staged = written.staging.close(rng) if written.staging else Staged(rng)
    except BaseException:
        if written.staging is not None:
            written.staging.abort()
        raise
    try:
        failpoint("flush.written")
        if not rng.resumed:
            source.record_claim(lease, rng)
            failpoint("flush.claimed")
        lease.check()
        committed = sink.commit(staged)
    except BaseException:
        sink.discard(staged)  # what was not committed
        raise
    seconds = 0.0 if started is None else time.monotonic() - started
    source.commit(lease, rng, Tally(files=len(committed.paths), file_bytes=staged.file_bytes,
                                    rows=staged.rows, arrow_bytes=staged.arrow_bytes,
                                    seconds=seconds))
    failpoint("flush.committed")
    return Done(rng, staged, committed)


def flush_range(source: RangeSource, sink: Sink, lease: Lease, start: Claim | str | None,
                max_bytes: int, encoder: Encoder) -> Done | None:
    """All five steps for one range, one after the other."""
    written = write_range(source, sink, lease, start, max_bytes, encoder)
    return None if written is None else commit_range(source, sink, lease, written)
