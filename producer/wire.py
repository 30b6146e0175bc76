"""The wire contract in one place: Redis key names, stream entry fields, Arrow IPC encoding,
the canonical form of schemas, and the names of the Celery messages.

docs/spec.md is the specification a producer in any language implements (deltaflush
protocol :data:`PROTOCOL`): it has the table of keys and fields, which this module names in
code (:class:`Keys`, the ``FIELD_*`` constants). Change one together with the other.
Task messages carry only table names: ``flush_table(table)`` and
``deltaflush.maintain_table(table)`` on the queue :data:`QUEUE`, serialised as JSON; a
producer never needs them (docs/spec.md, "Requesting a flush").
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import pyarrow as pa

# The canonical form of schemas (docs/spec.md, "Canonical schema"), part of the contract.
from .canonical import canonical_schema as canonical_schema
from .canonical import check_names
from .canonical import normalize as normalize
from .canonical import schema_from_canonical as schema_from_canonical

#: The version of the protocol this module implements (docs/spec.md): 2, sharded tables
#: (protocol 1 with shards; the same append check). The append check refuses a batch for a
#: table that requires a later one (``{prefix}:{<table>}:protocol``).
PROTOCOL = 2

#: Field of a delta entry holding the batch as Arrow IPC stream bytes.
FIELD_ARROW = b"arrow"
#: Field: the number of rows in the batch, as ASCII digits. Producers write it (docs/spec.md);
#: the flusher counts an entry out of ``{T}:pending`` only if it has one.
FIELD_ROWS = b"rows"
#: Field: the producer's ID of the batch (a retried append is not added twice).
FIELD_BATCH = b"batch"
#: Field added to a dead-letter entry: why it could not be flushed.
FIELD_ERROR = b"error"
#: Field added to a dead-letter entry: its ID in the delta stream.
FIELD_ENTRY_ID = b"entry_id"
#: Field of ``{prefix}:{<table>}:sched`` a producer sets to ask for a flush (docs/spec.md).
FIELD_FLUSH_REQUESTED = b"flush_requested"

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

#: A table name starts with a letter: never ``_``, which readers (Spark, Hive, pyarrow
#: dataset discovery) skip as hidden, and which every folder of deltaflush's own beside the
#: tables starts with (``_deltaflush_tmp``), so no table can ever be written into one.
TABLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")


def valid_table_name(name: object) -> bool:
    return isinstance(name, str) and TABLE_NAME_RE.fullmatch(name) is not None


#: Separates a table name from its shard number in a shard's hash tag (``{events~3}``); it
#: cannot occur in a table name, so no shard's keys are another table's.
SHARD_SEP = "~"


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one table, or of one shard of a sharded table (protocol 2,
    docs/shards.md).

    Shard 0 is the table's own keys, ``{prefix}:{<table>}:...``, so an unsharded table is
    shard 0 of itself; shard ``i >= 1`` has the hash tag ``{<table>~<i>}`` (another cluster
    slot): ``deltaflush:{events~3}:delta``. Each shard has its own stream, schema copy,
    counters, lease, fence, claim, dead letters and scheduling keys. The table-level keys
    (``config``, ``lake``, ``maint*``) are shard 0's whatever the shard, and
    ``authority`` is shard 0's ``schema``: the table's schema, which every shard's copy
    follows (docs/spec.md, protocol 2).
    """

    prefix: str
    table: str
    shard: int = 0

    @property
    def tag(self) -> str:
        """The hash tag: ``<table>`` for shard 0, ``<table>~<shard>`` for the others."""
        return self.table if self.shard == 0 else f"{self.table}{SHARD_SEP}{self.shard}"

    @property
    def stream(self) -> str:
        """The shard's name among the table's streams (sinks record their commits under
        it): the table name for shard 0, ``<table>~<shard>`` for the others."""
        return self.tag

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}:{{{self.tag}}}:{suffix}"

    def _table_k(self, suffix: str) -> str:
        return f"{self.prefix}:{{{self.table}}}:{suffix}"

    def for_shard(self, shard: int) -> Keys:
        return Keys(self.prefix, self.table, shard)

    @property
    def authority(self) -> str:
        """The table's schema: shard 0's ``schema`` (docs/spec.md, protocol 2)."""
        return self._table_k("schema")

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
        return self._table_k("config")

    @property
    def sched(self) -> str:
        return self._k("sched")

    @property
    def stuck(self) -> str:
        return self._k("stuck")

    @property
    def protocol(self) -> str:
        """The lowest protocol version a producer must speak to append (absent: 1)."""
        return self._k("protocol")

    @property
    def lake(self) -> str:
        return self._table_k("lake")

    @property
    def maint(self) -> str:
        return self._table_k("maint")

    @property
    def maint_lock(self) -> str:
        return self._table_k("maint_lock")

    @property
    def maint_fence(self) -> str:
        return self._table_k("maint_fence")

    def dedup(self, batch_id: str) -> str:
        """Remembers, for a short while, the entry ID a batch ID was appended as."""
        return self._k(f"batch:{batch_id}")


#: A stream entry as redis-py returns it (``decode_responses`` off): ID and fields.
Entry = tuple[bytes, dict[bytes, bytes]]


def shard_of_stream(stream: str) -> int:
    """The shard number of a stream name (``Keys.stream``): 0 for ``events``, 3 for
    ``events~3``."""
    _, sep, shard = stream.partition(SHARD_SEP)
    return int(shard) if sep else 0


def tables_key(prefix: str) -> str:
    return f"{prefix}:tables"


def sharded_key(prefix: str) -> str:
    """``{prefix}:sharded``: a hash of every table that ever had more than one shard, to the
    largest number of shards it ever had (decimal): every shard below it may hold data, so
    workers flush them all (``producer.shards``)."""
    return f"{prefix}:sharded"


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
    Arrow IPC stream (truncated, garbage, buffers inconsistent with the schema, or a name
    that is not UTF-8).

    Running out of memory is not the payload's fault: ``MemoryError`` passes through, so a
    flush fails and is retried instead of setting a good entry aside as a dead letter (and
    a retry must decode the same entries the same way, or a resumed range would differ).
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(payload))
        table = reader.read_all()
        _validate(table)
        check_names(table.schema)  # pyarrow decodes a name only when asked (docs/spec.md 6.2)
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


def stored_schema(data: bytes) -> pa.Schema:
    """The schema in ``{prefix}:{<table>}:schema`` or a claim's ``schema`` field.

    That is a canonical form (docs/spec.md), or, written by deltaflush before protocol 1,
    an IPC-serialised schema: read too, so that a claim left by an earlier worker is resumed
    with the very schema it recorded, and a table's old schema is replaced by its canonical
    form on the next append (the producer's compare-and-set, ``evolves_from``)."""
    if data[:1] == b"[":
        return schema_from_canonical(data)
    try:
        return normalize(pa.ipc.read_schema(pa.py_buffer(data)))
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"neither a canonical schema nor an IPC schema: {data[:200]!r}") \
            from exc


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
