"""The wire contract in one place: Redis key names, stream entry fields, Arrow IPC encoding,
and the names of the Celery messages. A producer in any language that follows this module
interoperates with the workers.

Keys (``{prefix}`` defaults to ``deltaflush``; the braces around the table are literal: a
Redis Cluster hash tag that keeps every key of one table in one slot):

===============================  ======  =====================================================
key                              type    content
===============================  ======  =====================================================
``{prefix}:tables``              set     names of all tables ever appended to
``{prefix}:{<table>}:delta``     stream  one entry per batch: ``arrow`` (Arrow IPC *stream*
                                         bytes), and ``rows`` (row count, optional)
``{prefix}:{<table>}:dead``      stream  entries that could not be flushed: original fields
                                         plus ``error`` and ``entry_id`` (the delta's ID)
``{prefix}:{<table>}:schema``    string  the table's Arrow schema (IPC-serialised), set by the
                                         first append; later appends must match it
``{prefix}:{<table>}:pending``   hash    ``rows``/``bytes`` appended and not yet flushed
``{prefix}:{<table>}:stats``     hash    ``files``/``rows``/``bytes`` flushed, ``dead``,
                                         ``last_flush_ms``
``{prefix}:{<table>}:lease``     string  fencing token of the flusher that owns the table (PX)
``{prefix}:{<table>}:fence``     string  counter the fencing tokens are drawn from (INCR)
``{prefix}:{<table>}:claim``     hash    the range the current flush is writing (see
                                         ``workers.flusher``)
``{prefix}:{<table>}:queued``    string  set while a ``flush_table`` for the table is queued
``{prefix}:{<table>}:config``    string  the table's layout and flush interval, JSON
                                         (``producer.tablecfg.TableConfig``)
``{prefix}:{<table>}:sched``     hash    ``interval_ms`` (the table's own flush interval)
                                         and ``last_ms`` (when it was last scheduled)
``{prefix}:{<table>}:stuck``     hash    set when a flush found the table's state broken:
                                         ``reason``, ``since_ms``; no flush runs until an
                                         operator clears it (``deltaflush table unstick``)
``{prefix}:{<table>}:batch:<id>`` string the entry ID of a recent batch ID (dedups retries)
``{prefix}:{<table>}:lake``      hash    a lake table as its sink last described it:
                                         ``format``, ``snapshot``, ``files``, ``small_files``,
                                         ``rows``, ``bytes``, ``at_ms`` (``workers.maintenance``)
``{prefix}:{<table>}:maint``     hash    ``last_ms`` (maintenance last scheduled),
                                         ``orphans_ms`` (orphan files last removed)
``{prefix}:{<table>}:maint_lock`` string token of the maintenance run that holds the table (PX)
``{prefix}:{<table>}:maint_fence`` string counter the maintenance tokens are drawn from
===============================  ======  =====================================================

Task messages carry only table names: ``flush_table(table)`` and
``deltaflush.maintain_table(table)`` on the queue :data:`QUEUE`, serialised as JSON.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import pyarrow as pa

#: Field of a delta entry holding the batch as Arrow IPC stream bytes.
FIELD_ARROW = b"arrow"
#: Optional field: the number of rows in the batch, as ASCII digits.
FIELD_ROWS = b"rows"
#: Optional field: the producer's ID of the batch (a retried append is not added twice).
FIELD_BATCH = b"batch"
#: Field added to a dead-letter entry: why it could not be flushed.
FIELD_ERROR = b"error"
#: Field added to a dead-letter entry: its ID in the delta stream.
FIELD_ENTRY_ID = b"entry_id"

#: Name of the Celery task that flushes one table; its only argument is the table name.
FLUSH_TASK = "flush_table"
#: Name of the periodic task that beat sends; it enqueues ``flush_table`` for due tables.
SCHEDULE_TASK = "deltaflush.schedule_flushes"
#: Name of the task that maintains one lake table (compaction, snapshot expiry, orphan
#: files); its only argument is the table name.
MAINTAIN_TASK = "deltaflush.maintain_table"
#: Queue of ``flush_table`` (and ``deltaflush.maintain_table``) messages.
QUEUE = "deltaflush"
#: Queue of the scheduling task, kept apart so that it never waits behind long flushes.
SCHEDULE_QUEUE = "deltaflush.schedule"

TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def valid_table_name(name: object) -> bool:
    return isinstance(name, str) and TABLE_NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one table."""

    prefix: str
    table: str

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}:{{{self.table}}}:{suffix}"

    @property
    def delta(self) -> str:
        return self._k("delta")

    @property
    def dead(self) -> str:
        return self._k("dead")

    @property
    def schema(self) -> str:
        return self._k("schema")

    @property
    def pending(self) -> str:
        return self._k("pending")

    @property
    def stats(self) -> str:
        return self._k("stats")

    @property
    def lease(self) -> str:
        return self._k("lease")

    @property
    def fence(self) -> str:
        return self._k("fence")

    @property
    def claim(self) -> str:
        return self._k("claim")

    @property
    def queued(self) -> str:
        return self._k("queued")

    @property
    def config(self) -> str:
        return self._k("config")

    @property
    def sched(self) -> str:
        return self._k("sched")

    @property
    def stuck(self) -> str:
        return self._k("stuck")

    @property
    def lake(self) -> str:
        return self._k("lake")

    @property
    def maint(self) -> str:
        return self._k("maint")

    @property
    def maint_lock(self) -> str:
        return self._k("maint_lock")

    @property
    def maint_fence(self) -> str:
        return self._k("maint_fence")

    def dedup(self, batch_id: str) -> str:
        """Remembers, for a short while, the entry ID a batch ID was appended as."""
        return self._k(f"batch:{batch_id}")


#: A stream entry as redis-py returns it (``decode_responses`` off): ID and fields.
Entry = tuple[bytes, dict[bytes, bytes]]


def tables_key(prefix: str) -> str:
    return f"{prefix}:tables"


# --- Arrow IPC ---------------------------------------------------------------------------


def encode_table(table: pa.Table, size: int | None = None) -> memoryview:
    """One payload: the Arrow IPC stream format, the table's schema and its batches.

    The buffer is handed to the socket as it is (no copy into ``bytes``), and written into
    one allocation of ``size`` (``payload_size(table)``): a growing buffer would copy and
    fault in its pages again as it grows."""
    buffer = pa.allocate_buffer(payload_size(table) if size is None else size)
    _write_stream(pa.FixedSizeBufferWriter(buffer), table)
    return memoryview(buffer)


def payload_size(table: pa.Table) -> int:
    """The size ``encode_table(table)`` will have, found without copying any data."""
    sink = pa.MockOutputStream()
    _write_stream(sink, table)
    return int(sink.size())


def encode_batches(schema: pa.Schema, batches: list[pa.RecordBatch]) -> bytes:
    """``encode_table`` of ``batches``, as ``bytes`` (for tests and tools)."""
    return bytes(encode_table(pa.Table.from_batches(batches, schema)))


#: The IPC format of every payload, fixed (pyarrow's default reads two environment
#: variables that could switch it to a pre-1.0 format, on every writer it opens).
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(metadata_version=pa.ipc.MetadataVersion.V5)


def _write_stream(sink: pa.NativeFile, table: pa.Table) -> None:
    with pa.ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table)


def decode_payload(payload: bytes) -> pa.Table:
    """Decode and fully validate one payload; raise ``ValueError`` if it is not a valid
    Arrow IPC stream (truncated, garbage, or buffers inconsistent with the schema).

    Running out of memory is not the payload's fault: ``MemoryError`` passes through, so a
    flush fails and is retried instead of setting a good entry aside as a dead letter (and
    a retry must decode the same entries the same way, or a resumed range would differ).
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(payload))
        table = reader.read_all()
        _validate(table)
    except MemoryError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"not a valid Arrow IPC stream: {exc}") from exc
    return table


#: String types, and the binary type with the same layout (offsets, then the bytes).
_BINARY_LAYOUT = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


def _validate(table: pa.Table) -> None:
    """``table.validate(full=True)``, in two thirds of the time for the usual string columns.

    Full validation checks every string value for UTF-8 one by one: 0.035 s of decoding
    2M rows of the benchmark schema, against 0.003 s for reading the IPC (0.023 s this way,
    docs/performance.md). A string array whose offsets are valid (checked as
    the binary array it is laid out as) and whose whole data buffer is ASCII is valid
    UTF-8 whatever its offsets cut; anything else gets pyarrow's full validation."""
    table.validate()
    for column in table.columns:
        for chunk in column.chunks:
            binary = _BINARY_LAYOUT.get(chunk.type)
            if binary is not None and _ascii(chunk.buffers()[2]):
                chunk.view(binary).validate(full=True)
            else:
                chunk.validate(full=True)


def _ascii(data: pa.Buffer | None) -> bool:
    if data is None:
        return True
    try:
        codecs.ascii_decode(memoryview(data))
    except UnicodeDecodeError:
        return False
    return True


def serialize_schema(schema: pa.Schema) -> bytes:
    return schema.serialize().to_pybytes()


def deserialize_schema(data: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(data))


# --- stream IDs ----------------------------------------------------------------------------


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """``b"1732480000000-7"`` -> ``(1732480000000, 7)``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: bytes | str) -> str:
    """The smallest stream ID greater than ``entry_id`` (for exact ``XTRIM MINID``)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"
