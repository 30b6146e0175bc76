"""Reads across both tiers: ``Producer.read``, one consistent snapshot of a table.

A table's rows are in two tiers: the lake (Parquet files, an Iceberg or a Delta table) and
the delta (each stream's entries in Redis). A flush moves a range of entries from one to
the other in order (``workers.protocol``): it commits the range to the lake (step 4), then
trims it from the stream (step 5), writing the range's last entry ID to the stream's
``stats`` hash (``last_id``) in the same script. Ranges are taken from the stream's head
one after the other, so for each stream:

* a lake snapshot whose watermark is ``W`` (the last entry ID of the last range it holds)
  holds every row of every entry up to ``W``, and none after;
* once a stream's ``last_id`` is ``C``, every entry up to ``C`` is trimmed, every entry
  after it is still there, and every range up to ``C`` that had rows is in the lake
  (a range whose entries were all dead letters commits no data, and an Iceberg table's
  watermark does not move for it).

**The snapshot**, for each stream of the table:

1. read the stream's entries up to its newest one ``T``, ``XRANGE`` chunk by chunk, each
   chunk in one ``MULTI`` with the stream's ``last_id``, the last of which is ``C``;
2. then pin a lake snapshot with its watermarks ``W`` (``producer.lakes``);
3. the rows are the lake snapshot's, and those of the entries read that are after ``W``.

* *No gap.* An entry up to ``T`` is either read, or it was trimmed before it could be
  (trimming is contiguous from the head), so it is at most ``C``: its range, if it had
  rows, was committed before ``C`` was written, before the lake snapshot was pinned, so
  it is at most ``W``.
* *No duplicate.* The lake holds nothing after ``W``; the entries read up to ``W`` are
  left out.
* *Read-your-writes.* An entry appended before the call is at most ``T``, so it is in.

Nothing is retried: a flush that commits during the read only moves the point where the
lake ends and the delta begins. The snapshot is the stream up to ``max(T, W)``, a prefix.

A ``parquet`` table's files carry their range in their names: its lake snapshot is the
files of each stream's ranges up to its ``C`` (published before that trim), listed after
it; files of later ranges are left out, since a partitioned range publishes its files one
after the other (``producer.lakes.FolderSnapshot``).

**Memory.** The entries are read first (the delta is trimmed within seconds, while a lake
snapshot stays valid for as long as the table keeps its snapshots), as raw payloads: in
memory up to ``SPILL_BYTES``, in an unlinked temporary file beyond. Then the lake's rows
are streamed, then the entries are decoded, a chunk at a time, by the flusher's own
``producer.decoding.decode`` (a dead letter is left out, as a flush leaves it out).

**Schema.** The table's schema as stored once the lake snapshot is pinned (any entry read,
and any file of the lake, has it or an older one), in the types its files get
(``producer.typepolicy.write_schema``: e.g. microsecond timestamps for a
``spark_compatible`` table): older rows read null for columns added since, widened types
are cast.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from producer import admin, cluster, lakes, shards, wire
from producer.decoding import decode
from producer.errors import InvalidInput, NotYetVisible
from producer.settings import Settings
from producer.storage import Storage
from producer.tablecfg import TableConfig
from producer.typepolicy import spark_safe

#: Entries per ``XRANGE`` round trip (one ``MULTI`` each).
CHUNK_ENTRIES = 512
#: Raw payloads held in memory before the rest go to a temporary file.
SPILL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Stream:
    """One stream of a table: its name in the lake's records and its keys."""

    name: str
    keys: wire.Keys


def streams_of(client: Any, keys: wire.Keys) -> list[Stream]:
    """The streams of a table: its delta, or each shard's (``producer.shards``)."""
    return [Stream(k.stream, k) for k in shards.table_shards(client, keys.prefix, keys.table)]


def _id(entry_id: str | bytes | None) -> tuple[int, int]:
    return (-1, -1) if entry_id is None else wire.parse_id(entry_id)


def _latest(*ids: str | None) -> str | None:
    known = [i for i in ids if i is not None]
    return max(known, key=_id) if known else None


def _text(value: Any) -> str | None:
    return None if value is None else (value.decode() if isinstance(value, bytes) else
                                       str(value))


#: A chunk of entries as the spool keeps them: their stream, IDs and payloads.
Chunk = tuple[str, list[str], list[bytes]]


class Spool:
    """Chunks of raw entries: in memory up to ``limit`` bytes, then in a temporary file."""

    def __init__(self, limit: int = SPILL_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self.entries = 0
        self._memory: list[Chunk] = []
        self._lengths: list[tuple[str, list[str], list[int]]] = []
        self._file: IO[bytes] | None = None

    def add(self, stream: str, ids: list[str], payloads: list[bytes]) -> None:
        size = sum(len(p) for p in payloads)
        if self._file is None and self.size + size > self.limit:
            self._file = tempfile.TemporaryFile(prefix="deltaflush-read-")
            for chunk in self._memory:
                self._write(*chunk)
            self._memory = []
        if self._file is not None:
            self._write(stream, ids, payloads)
        else:
            self._memory.append((stream, ids, payloads))
        self.size += size
        self.entries += len(payloads)

    def _write(self, stream: str, ids: list[str], payloads: list[bytes]) -> None:
        assert self._file is not None
        for p in payloads:
            self._file.write(p)
        self._lengths.append((stream, ids, [len(p) for p in payloads]))

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __iter__(self) -> Iterator[Chunk]:
        if self._file is None:
            yield from self._memory
            return
        self._file.seek(0)
        for stream, ids, lengths in self._lengths:
            yield stream, ids, [self._file.read(n) for n in lengths]

    def close(self) -> None:
        self._memory = []
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class View:
    """What a snapshot holds of one stream: the lake's rows up to ``start`` (its
    watermark), the delta's entries after it up to ``end`` (the newest entry when the
    stream was read; None if it had none)."""

    stream: str
    start: str | None
    end: str | None

    @property
    def high(self) -> str | None:
        return _latest(self.start, self.end)


def capture(client: Any, stream: Stream, spool: Spool) -> tuple[str | None, str | None]:
    """Read every entry of ``stream`` up to its newest one into ``spool``, chunk by chunk,
    each chunk in one ``MULTI`` with the stream's ``last_id``. Returns ``(newest entry,
    last_id read with the last chunk)``: every entry up to the newest is in the spool or
    trimmed up to that ``last_id`` (see the module doc)."""
    keys = stream.keys

    def multi(queue: Callable[[Any], object]) -> list[Any]:
        def run(master: Any) -> list[Any]:  # a Redis Cluster: on the slot's master
            pipe = master.pipeline(transaction=True)
            queue(pipe)
            return cast(list[Any], pipe.execute())

        return cluster.on_master(client, keys.delta, run)

    committed, tail, chunk = multi(lambda pipe: (
        pipe.hget(keys.stats, "last_id"), pipe.xrevrange(keys.delta, count=1),
        pipe.xrange(keys.delta, "-", "+", count=CHUNK_ENTRIES)))
    end = _text(tail[0][0]) if tail else None
    while True:
        taken = [(cast(str, _text(i)), f) for i, f in chunk if _id(i) <= _id(end)]
        if taken:
            spool.add(stream.name, [i for i, _ in taken],
                      [f.get(wire.FIELD_ARROW, b"") for _, f in taken])
        if len(chunk) < CHUNK_ENTRIES or not taken or _id(taken[-1][0]) >= _id(end):
            return end, _text(committed)
        after = "(" + taken[-1][0]

        def more(pipe: Any, after: str = after) -> None:
            pipe.hget(keys.stats, "last_id")
            pipe.xrange(keys.delta, after, end, count=CHUNK_ENTRIES)

        committed, chunk = multi(more)


@dataclass
class Snapshot:
    """A lake snapshot and the delta entries after it, for every stream of a table."""

    lake: lakes.LakeSnapshot
    views: list[View]
    spool: Spool
    watermarks: dict[str, str | None] = field(default_factory=dict)

    def reaches(self, wanted: list[tuple[str | None, str]]) -> bool:
        """Whether the snapshot holds every ``(stream, entry ID)`` of ``wanted`` (stream
        None: the ID of an unsharded table's append, held by any stream)."""
        highs = {v.stream: _id(v.high) for v in self.views}
        return all(any(h >= _id(entry) for h in highs.values()) if stream is None
                   else highs.get(stream, (-1, -1)) >= _id(entry) for stream, entry in wanted)

    def newest(self) -> str | None:
        return _latest(*(v.high for v in self.views))


def take(client: Any, storage: Storage, settings: Settings, table: str, config: TableConfig,
         fmt: str, streams: list[Stream]) -> Snapshot:
    """One consistent snapshot of the table (see the module doc)."""
    spool = Spool()
    try:
        read = {s.name: capture(client, s, spool) for s in streams}
        lake = lakes.snapshot(fmt, storage, settings, table, config, [s.name for s in streams])
    except BaseException:
        spool.close()
        raise
    if lake.pinned_by_redis:
        lake.pin({name: trimmed for name, (_, trimmed) in read.items()})
    marks = dict(lake.watermarks)
    views = [View(name, marks.get(name), end) for name, (end, _) in read.items()]
    return Snapshot(lake, views, spool, marks)


def _fit(data: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """``data`` with exactly the columns of ``schema``: cast where the type differs, null
    where missing."""
    columns = []
    for f in schema:
        if f.name in data.schema.names:
            column = data.column(f.name)
            if not column.type.equals(f.type):
                column = pc.cast(column, f.type, safe=False)
        else:
            column = pa.nulls(data.num_rows, f.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _delta_batches(snap: Snapshot, table: str, stored: pa.Schema, config: TableConfig,
                   full: pa.Schema, out: pa.Schema, filter: pc.Expression | None
                   ) -> Iterator[pa.RecordBatch]:
    """The entries read after their stream's watermark, decoded as a flush decodes them,
    a chunk at a time, in ``full`` (the lake's types); ``out``'s columns of the rows
    matching ``filter``."""
    written, cast_to_written = spark_safe(stored, config)
    for stream, ids, payloads in snap.spool:
        mark = _id(snap.watermarks.get(stream))
        rows = []
        for entry_id, payload in zip(ids, payloads, strict=True):
            if _id(entry_id) <= mark:  # the lake holds it
                continue
            try:
                rows.append(decode(payload, stored, table, config.spark_compatible,
                                   config.format))
            except ValueError:  # a dead letter: no flush writes it either
                continue
        if not rows:
            continue
        data = _fit(cast_to_written(pa.concat_tables(rows) if len(rows) > 1 else rows[0]),
                    full)
        if filter is not None:
            data = data.filter(filter)
        yield from _fit(data, out).to_batches()


@dataclass
class Opened:
    """A snapshot and the schemas it is read in: the table's as stored, its files' (see
    ``typepolicy.spark_safe``), and the lake's (``full``, every column)."""

    table: str
    snap: Snapshot
    config: TableConfig
    stored: pa.Schema
    full: pa.Schema

    def project(self, columns: Sequence[str] | None) -> pa.Schema:
        wanted = list(self.full.names if columns is None else columns)
        if not wanted:
            self.snap.spool.close()
            raise InvalidInput(f"columns=[] selects nothing: name at least one column of "
                               f"{self.table!r} ({', '.join(self.full.names)}), or pass None "
                               "for all")
        missing = [c for c in wanted if c not in self.full.names]
        if missing:
            self.snap.spool.close()
            raise InvalidInput(f"table {self.table!r} has no column {missing[0]!r}; its "
                               f"columns: {', '.join(self.full.names)}")
        return pa.schema([self.full.field(c) for c in wanted])

    def batches(self, out: pa.Schema, filter: pc.Expression | None
                ) -> Iterator[pa.RecordBatch]:
        try:
            for batch in lakes.batches(self.snap.lake.dataset(self.full), out.names, filter):
                yield from _fit(batch, out).to_batches()
            yield from _delta_batches(self.snap, self.table, self.stored, self.config,
                                      self.full, out, filter)
        finally:
            self.snap.spool.close()

    def dataset(self) -> ds.Dataset:
        """The snapshot as one dataset that can be scanned many times: the lake's files,
        and the delta's rows decoded into memory."""
        delta = list(_delta_batches(self.snap, self.table, self.stored, self.config,
                                    self.full, self.full, None))
        self.snap.spool.close()
        parts = [ds.InMemoryDataset(pa.Table.from_batches(delta, self.full))]
        lake = self.snap.lake.dataset(self.full)
        if lake is not None:
            parts.insert(0, lake)
        return ds.dataset(parts) if len(parts) > 1 else parts[0]


def _entry_ids(keys: wire.Keys, min_id: str) -> list[tuple[str | None, str]]:
    """``(stream, entry ID)`` of each ID in what ``append`` returned: ``<ms>-<seq>``, or
    for a sharded table ``<shard>:<ms>-<seq>``, several separated by spaces."""
    out: list[tuple[str | None, str]] = []
    for part in str(min_id).split():
        shard, sep, entry = part.rpartition(":")
        try:
            wire.parse_id(entry)
            stream = keys.for_shard(int(shard)).stream if sep else None
        except ValueError as exc:
            raise InvalidInput(f"min_id={min_id!r} is not what append returns: a stream entry "
                               "ID such as '1732480000000-0' (or '2:1732480000000-0' for "
                               "shard 2 of a sharded table)") from exc
        out.append((stream, entry))
    if not out:
        raise InvalidInput(f"min_id={min_id!r} is empty; pass what append returned")
    return out


def open_snapshot(client: Any, settings: Settings, table: str, min_id: str | None = None,
                  timeout_s: float = 10.0) -> Opened | None:
    """A snapshot of ``table`` holding ``min_id`` (if given); None if the table never had
    a batch (it has no schema)."""
    keys = admin.require_table(client, settings.key_prefix, table)
    wanted = [] if min_id is None else _entry_ids(keys, min_id)
    config = admin.table_config(client, keys)
    fmt = config.format or settings.table_format
    storage = Storage(settings.storage_uri)
    streams = streams_of(client, keys)
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        snap = take(client, storage, settings, table, config, fmt, streams)
        if snap.reaches(wanted):
            break
        snap.spool.close()
        if time.monotonic() >= deadline:
            raise NotYetVisible(table, str(min_id), snap.newest(), timeout_s)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)
    raw = cast(bytes | None, client.get(keys.authority))
    if not raw:  # configured, never appended to
        snap.spool.close()
        return None
    stored = wire.stored_schema(raw)
    written, _ = spark_safe(stored, config)
    # the format as the first flush pins it: a flush and a read leave out the same entries
    return Opened(table, snap, config.with_format(fmt), stored, snap.lake.schema(written))


def read(client: Any, settings: Settings, table: str, columns: Sequence[str] | None = None,
         filter: pc.Expression | None = None, min_id: str | None = None,
         timeout_s: float = 10.0) -> pa.RecordBatchReader:
    """See ``Producer.read``."""
    if filter is not None and not isinstance(filter, pc.Expression):
        raise InvalidInput(f"filter must be a pyarrow.compute.Expression, e.g. "
                           f"pc.field('country') == 'de'; got {type(filter).__name__}")
    opened = open_snapshot(client, settings, table, min_id, timeout_s)
    if opened is None:
        return pa.RecordBatchReader.from_batches(pa.schema([]), iter(()))
    out = opened.project(columns)
    return pa.RecordBatchReader.from_batches(out, opened.batches(out, filter))


def dataset(client: Any, settings: Settings, table: str, min_id: str | None = None,
            timeout_s: float = 10.0) -> ds.Dataset:
    """See ``Producer.dataset``."""
    opened = open_snapshot(client, settings, table, min_id, timeout_s)
    if opened is None:
        return ds.InMemoryDataset(pa.table({}))
    return opened.dataset()
