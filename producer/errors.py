"""The exceptions of deltaflush, one rooted hierarchy.

::

    DeltaflushError
    ├── ConfigError(ValueError)            a setting is invalid: fix the environment/arguments
    │   └── LayoutLocked                   the table's files fix its layout: use a new table
    ├── InvalidInput(ValueError)           the caller's data is at fault: fix the input
    │   ├── InvalidTableName
    │   ├── UnsupportedData
    │   ├── BatchTooLarge                  split the batch
    │   ├── SchemaConflict                 names the column, the table's type and the batch's
    │   ├── UnsupportedType                a column's type some reader rejects: cast it
    │   └── UnknownTable                   no table of that name was ever appended to
    ├── Backpressure                       the table is too far behind: retry later
    ├── BufferFull                         a batcher's buffer stayed full: retry later
    ├── SchemaRace                         the table's schema kept changing meanwhile: retry
    ├── UpgradeRequired                    the table needs a later protocol: upgrade deltaflush
    ├── ReplicationTimeout                 fewer replicas than asked for hold a write: retry
    ├── ReadError                          a read of both tiers (``Producer.read``) failed
    │   └── NotYetVisible                  the entry asked for (``min_id``) is not there yet
    └── FlushError                         raised on the worker side
        ├── LeaseLost                      another flusher took the table over: stop, do not commit
        ├── CatalogUnavailable(OSError)    a lake table's catalog failed: retried with backoff
        └── InvariantViolation             the table's state breaks the protocol: the table is
            │                              marked stuck, never retried in a loop
            ├── ClaimMismatch              the claim, or the entries read for it, are not the range
            ├── NotAtHead                  the claimed range does not start at the delta's head
            ├── LakeSchemaError            a type or value the lake format cannot hold losslessly
            └── LakePanic                  delta-rs panicked (a bug in it met by this table)

Nothing is written to Redis or storage when an ``InvalidInput`` is raised. Transient
failures (a lost connection, a storage error) keep their own types (``redis.ConnectionError``,
``OSError``): the worker retries them with backoff.
"""

from __future__ import annotations


class DeltaflushError(Exception):
    """Root of every error deltaflush raises on purpose."""


class ConfigError(DeltaflushError, ValueError):
    """A setting is invalid. The message names the setting and a valid example."""


class InvalidInput(DeltaflushError, ValueError):
    """The caller's input is at fault; nothing was written. Fix the input and call again."""


class InvalidTableName(InvalidInput):
    """A table name does not match ``^[A-Za-z][A-Za-z0-9_]{0,127}$``."""

    def __init__(self, name: object) -> None:
        self.name = name
        super().__init__(
            f"invalid table name {name!r}: a table name starts with a letter and holds "
            "only letters, digits and '_' (at most 128 characters), e.g. 'page_views'"
        )


class UnsupportedData(InvalidInput):
    """``append`` was given something it cannot turn into Arrow, or an empty batch."""


class BatchTooLarge(InvalidInput):
    """One batch's Arrow IPC payload is over ``max_batch_bytes``."""

    def __init__(self, table: str, size: int, limit: int) -> None:
        self.table, self.size, self.limit = table, size, limit
        super().__init__(
            f"a batch of {size} bytes for table {table!r} is over the limit of {limit} bytes "
            "(DELTAFLUSH_MAX_BATCH_BYTES): split it, e.g. with "
            "append_many(table, data.to_batches(max_chunksize=...))"
        )


class Backpressure(DeltaflushError):
    """The table has more than ``max_pending_bytes`` waiting for a flush. Nothing was written.

    Retryable: wait for the workers to catch up (``retry_after_s`` is a hint), or pass
    ``timeout_s`` to ``append`` to wait inside it. Add workers if it persists.
    """

    def __init__(self, table: str, pending_bytes: int, limit: int) -> None:
        self.table, self.pending_bytes, self.limit = table, pending_bytes, limit
        self.retry_after_s = 1.0
        super().__init__(
            f"table {table!r} has {pending_bytes} bytes pending, over the limit of {limit} "
            "(DELTAFLUSH_MAX_PENDING_BYTES); nothing was written. Retry after the workers "
            "catch up, or add workers."
        )


class BufferFull(DeltaflushError):
    """A batcher's buffer (``max_buffer_bytes``) stayed full for ``max_block_s``: its
    background thread could not send as fast as rows were written (Redis slow or refusing
    with ``Backpressure``). Nothing of the write was buffered; retryable."""

    def __init__(self, buffered: int, limit: int, waited_s: float) -> None:
        self.buffered, self.limit, self.waited_s = buffered, limit, waited_s
        waited = (f"did not drain within {waited_s} s (max_block_s)" if waited_s else
                  "an asyncio batcher does not wait (await its flush() to make room)")
        super().__init__(
            f"the batcher's buffer holds {buffered} bytes, at its limit of {limit} "
            f"(max_buffer_bytes), and {waited}; nothing of this write was buffered. Retry "
            "later, give the batcher a larger max_buffer_bytes, or add workers if the "
            "tables are behind."
        )


class SchemaRace(DeltaflushError):
    """The table's schema changed every time this batch was sent (other producers evolving
    it at the same moment), more often than the producer retries. Nothing was written;
    retryable."""

    def __init__(self, table: str, tries: int, same: bool = False) -> None:
        self.table, self.tries = table, tries
        if same:  # a CONFLICT that returned the very schema the batch was shaped for
            super().__init__(
                f"Redis refused this batch for table {table!r} for a schema change, but "
                "returned the schema the batch was already shaped for: reshaping cannot help, "
                "and the same payload is not sent again (docs/spec.md, section 8; is the "
                "append check protocol 1's?). Nothing of the batch was written."
            )
            return
        super().__init__(
            f"the schema of table {table!r} changed {tries} times while this batch was being "
            "appended (other producers evolving it at the same moment); nothing of the batch "
            "was written. Retry the append."
        )


class UpgradeRequired(DeltaflushError):
    """The table requires a later version of the deltaflush protocol than this producer
    speaks (``{prefix}:{<table>}:protocol``). Nothing was written."""

    def __init__(self, table: str, required: int, spoken: int) -> None:
        self.table, self.required, self.spoken = table, required, spoken
        super().__init__(
            f"table {table!r} requires deltaflush protocol {required}; this producer speaks "
            f"protocol {spoken}. Nothing was written: upgrade the producer (docs/spec.md, "
            "\"Versions\")."
        )


class ReadError(DeltaflushError):
    """A read of both tiers (``Producer.read``) could not give what was asked. Retryable."""


class NotYetVisible(ReadError):
    """``read(min_id=...)``: the table's delta had not reached that entry ID within the
    timeout (the ID is from another Redis, a replica behind, or not an ID ``append``
    returned)."""

    def __init__(self, table: str, min_id: str, seen: str | None, timeout_s: float) -> None:
        self.table, self.min_id, self.seen = table, min_id, seen
        super().__init__(
            f"table {table!r}: entry {min_id} is not visible after {timeout_s:g} s (the "
            f"newest entry is {seen or 'none'}); pass an entry ID that append returned for "
            "this table on this Redis, or a longer timeout_s")


MISSING = "no such column"


class ReplicationTimeout(DeltaflushError):
    """Fewer replicas than ``DELTAFLUSH_APPEND_REPLICAS`` acknowledged a write (Redis
    ``WAIT``) within ``DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS``. The write stands on the
    master, but a failover before its replicas catch up could lose it.

    Retryable. For an ``append``, ``batch_ids`` holds the IDs of the batches concerned:
    ``append(..., batch_id=...)`` with the same ID within two minutes adds nothing twice and
    waits for the replicas again. A flush retries by itself (it publishes and trims nothing
    after a failed wait)."""

    def __init__(self, what: str, acked: int, wanted: int, timeout_ms: int,
                 batch_ids: tuple[str, ...] = ()) -> None:
        self.what = what
        self.acked = acked
        self.wanted = wanted
        self.timeout_ms = timeout_ms
        self.batch_ids = batch_ids
        retry = (f"; retry with the same batch ID (append(..., batch_id={batch_ids[0]!r})), "
                 "which is never added twice" if len(batch_ids) == 1 else
                 f"; retry with the same batch IDs ({len(batch_ids)} in .batch_ids), which "
                 "are never added twice" if batch_ids else "")
        super().__init__(
            f"{what}: {acked} of the {wanted} replicas asked for "
            f"(DELTAFLUSH_APPEND_REPLICAS={wanted}) acknowledged it within {timeout_ms} ms "
            f"(DELTAFLUSH_APPEND_REPLICAS_TIMEOUT_MS). It is on the Redis master, but a "
            f"failover before its replicas catch up could lose it. Check that the master's "
            f"replicas are up and in sync (INFO replication){retry}")


class SchemaConflict(InvalidInput):
    """A batch's schema conflicts with the schema the table already has."""

    def __init__(self, table: str, column: str, table_type: str, batch_type: str) -> None:
        self.table = table
        self.column = column
        self.table_type = table_type
        self.batch_type = batch_type
        if batch_type == MISSING:
            fix = f"the batch lacks it. Add column {column!r} to the batch"
        elif table_type == MISSING:
            fix = f"the table has no such column. Drop {column!r} from the batch"
        else:
            fix = (f"the table has {table_type}, the batch has {batch_type}. Cast the column "
                   f"to {table_type}")
        super().__init__(
            f"schema conflict in table {table!r}, column {column!r}: {fix} before "
            "appending, or append to a new table."
        )


class UnsupportedType(InvalidInput):
    """A column has a type that the table cannot write for every reader (see
    ``producer.typepolicy``); nothing was written."""

    def __init__(self, table: str, column: str, type_: str, reason: str, fix: str) -> None:
        self.table, self.column, self.type = table, column, type_
        what = f"column {column!r} ({type_})" if column != "*" else "a column"
        super().__init__(f"table {table!r} cannot take {what}: {reason}. Fix: {fix}.")


class UnknownTable(InvalidInput):
    """No table of this name is registered (``{prefix}:tables``): it was never appended to
    or configured. Often a typo; the message lists close names."""

    def __init__(self, name: str, close: list[str]) -> None:
        self.name = name
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            "; `deltaflush status` lists the tables"
        super().__init__(f"unknown table {name!r}: no batch was ever appended to it{hint}")


class LayoutLocked(ConfigError):
    """A change of a table's partitioning (or ``spark_compatible``) refused: files written
    in the old layout exist, or a running flush may be writing them."""


class FlushError(DeltaflushError):
    """Root of the errors a flush raises; the task maps them to retries or a clean stop."""


class LeaseLost(FlushError):
    """This flusher's lease expired and another flusher may own the table: stop, commit nothing."""


class InvariantViolation(FlushError):
    """The table's state in Redis breaks an invariant of the flush protocol, while this
    flusher still holds its lease: retrying cannot help. The worker marks the table stuck
    (``deltaflush status`` shows why), flushes the other tables, and leaves the table alone
    until an operator clears the mark (``deltaflush table unstick``)."""


class ClaimMismatch(InvariantViolation):
    """The claim, or the entries read back for it, are not the range being flushed."""


class NotAtHead(InvariantViolation):
    """The claimed range does not start at the delta's head: trimming it would remove entries
    that no file holds, so nothing was trimmed."""


class LakeSchemaError(InvariantViolation):
    """A range holds a type, a value or a schema change that the table's lake format cannot
    hold without loss (an Iceberg column cannot change from int to double, for instance).
    The table is marked stuck with this message; its entries stay in Redis."""


class CatalogUnavailable(FlushError, OSError):
    """A lake table's catalog could not be reached, failed, or kept conflicting with other
    commits. Nothing was trimmed: like a storage error (an ``OSError``), the flush is
    retried with backoff and its next try resumes the claim."""


class LakePanic(InvariantViolation):
    """delta-rs panicked: a bug in it, met by this table's data or log. A Rust panic reaches
    Python as pyo3's ``PanicException``, a ``BaseException`` that Celery does not catch: it
    would end the worker's process, and the redelivered task would end the next one. As
    this error the table is marked stuck instead (nothing is trimmed; an ambiguous commit is
    found by the exactly-once check once the table is unstuck), and the other tables go on."""
