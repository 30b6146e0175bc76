"""A Parquet file writer that streams: ``write()`` many times, ``close()`` once.

Batches are buffered until a row group's worth (``row_group_bytes`` of Arrow data) has
gathered, then encoded in a background thread while the next row group gathers (pyarrow
releases the GIL while encoding, so reading from Redis and encoding overlap on two cores).
The first row group of a flush is a twelfth of a full one (the first of a file read ahead,
an eighth) and each next one 1.5 times the last, up to full size: the encoder starts after
a twelfth of a row group has been read, and each row group is gathered while the smaller
one before it encodes (reading runs faster than encoding, but not twice as fast), so the
encoder never waits on Redis after the start. Measured in docs/performance.md.
Written row groups of a local file start their way to the disk while the next ones encode
(``posix_fadvise(DONTNEED)``), so the fsync at publish waits for little: 8.3 -> 3.8 ms for a
12 MiB file in docs/performance.md.
Memory holds about two row groups, whatever the file's size. A table with a sort order
buffers the whole file instead (at most ``max_file_bytes``), sorts it and then writes it;
the flusher reads no range ahead for it, so it holds one such file at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from producer.tablecfg import TableConfig

#: Parquet options every file gets; readable by pyarrow, DuckDB, polars and Spark as-is.
BASE_OPTIONS: dict[str, Any] = {"version": "2.6", "data_page_size": 1024 * 1024}
#: The first row group of a flush holds 1/this of a full one, and each next one ``RAMP``
#: times the last, up to full size (see ``ParquetFile``).
FIRST_ROW_GROUP_FRACTION = 12
#: ... or 1/this for a file read ahead, while the encoder is still busy with the one before.
AHEAD_ROW_GROUP_FRACTION = 8
RAMP = 1.5
_FADVISE = hasattr(os, "posix_fadvise")  # Linux and most Unixes; not macOS or Windows


class Encoder:
    """The background thread that encodes a flush's row groups, whatever file they belong
    to, with at most one encoding while the next gathers: ``submit`` first waits for the
    row group submitted before (and raises its error). That bounds a flush's memory to
    about two row groups, even while one range is closed and the next one read."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="parquet-encode")
        self._last: Future[None] | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> Future[None]:
        with self._lock:
            if self._last is not None:
                self._last.result()
            self._last = self._pool.submit(fn, *args, **kwargs)
            return self._last

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown()


@dataclass(frozen=True)
class WrittenFile:
    """A closed file of a ``FileSet``: its partition ``folder``, temporary path, size, rows
    and Parquet footer (``pyarrow.parquet.FileMetaData``, with column statistics)."""

    folder: str
    temp: str
    size: int
    rows: int
    metadata: Any


class ParquetFile:
    """Write one Parquet file to ``sink`` with ``schema``; metadata is added at close."""

    def __init__(self, sink: pa.NativeFile, schema: pa.Schema, row_group_bytes: int,
                 config: TableConfig, encoder: Encoder, first_fraction: int) -> None:
        self.sink = sink
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self.row_group_rows = config.row_group_rows
        self.sort_keys = [(c, "ascending") for c in config.sort_by if c in schema.names]
        options = {**BASE_OPTIONS, **config.parquet_options(schema)}
        self._writer = pq.ParquetWriter(sink, schema, **options)
        # A local file's written row groups are handed to the disk while the next ones
        # encode, so that the fsync at publish finds little left to write (see below).
        self._fd = sink.fileno() if isinstance(sink, pa.OSFile) and _FADVISE else None
        self._encoder = encoder  # shared by every file of the flush
        self._encoding: Future[None] | None = None
        self._buffer: list[pa.Table] = []
        # Row groups ramp up to full size, so that encoding starts sooner (see above).
        self._threshold = max(1, row_group_bytes // first_fraction)
        self.buffered = 0
        self.rows = 0
        self.arrow_bytes = 0

    def write(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self.buffered += table.nbytes
        self.rows += table.num_rows
        self.arrow_bytes += table.nbytes
        if self.buffered >= self._threshold and not self.sort_keys:
            self.flush_buffer()

    def flush_buffer(self) -> None:
        """Encode what is buffered as row groups now."""
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer.clear()
        self.buffered = 0
        self._threshold = min(self.row_group_bytes, int(self._threshold * RAMP))
        if self.sort_keys:
            table = table.sort_by(self.sort_keys)
        # waits for the row group before (of any file) to be encoded
        self._encoding = self._encoder.submit(
            self._writer.write_table, table, row_group_size=self.row_group_rows)
        if self._fd is not None:
            # Start writing back what the row groups before put in the page cache, without
            # waiting for it, and drop it from the cache (nobody reads it back from here).
            # Only a hint: the fsync at publish is what makes the file durable.
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def _wait(self) -> None:
        if self._encoding is not None:
            encoding, self._encoding = self._encoding, None
            encoding.result()

    def close(self, metadata: dict[str, str]) -> tuple[int, Any]:
        """Encode what is buffered, add ``metadata`` and close; return the file's size and
        its footer (``FileMetaData``)."""
        self.flush_buffer()
        self._wait()
        self._writer.add_key_value_metadata(metadata)
        self._writer.close()
        size = self.sink.tell()
        self.sink.close()
        return int(size), self._writer.writer.metadata

    def abort(self) -> None:
        try:
            try:
                self._wait()
            finally:
                self._writer.close()
        finally:
            self.sink.close()


class FileSet:
    """The files of one claimed range: one ``ParquetFile`` per partition folder.

    ``open_temp(folder)`` returns ``(temporary path, sink)`` for a new file. The buffers of
    all files together stay under ``row_group_bytes`` (unless sorting, which holds each file
    whole): when they pass it, the largest buffer is written out as a row group. All files
    share the flush's ``encoder`` with the ranges before and after: ``seal()`` hands the
    last buffers to it when the range is read, ``close()`` (possibly on another thread,
    while the next range is read) waits for them and closes the files. A range read ahead
    (``ahead``) starts its files with larger row groups: the encoder is not waiting for it.
    """

    def __init__(self, layout: Any, open_temp: Any, row_group_bytes: int,
                 config: TableConfig, encoder: Encoder, ahead: bool) -> None:
        self.layout = layout
        self.first_fraction = AHEAD_ROW_GROUP_FRACTION if ahead else FIRST_ROW_GROUP_FRACTION
        self.open_temp = open_temp
        self.row_group_bytes = row_group_bytes
        self.config = config
        self.files: dict[str, tuple[str, ParquetFile]] = {}
        self.encoder = encoder

    @property
    def rows(self) -> int:
        return sum(f.rows for _, f in self.files.values())

    @property
    def arrow_bytes(self) -> int:
        return sum(f.arrow_bytes for _, f in self.files.values())

    def write(self, batch: pa.Table) -> None:
        for folder, rows in self.layout.split(batch):
            if folder not in self.files:
                temp, sink = self.open_temp(folder)
                self.files[folder] = (temp, ParquetFile(
                    sink, self.layout.file_schema, self.row_group_bytes, self.config,
                    self.encoder, self.first_fraction))
            self.files[folder][1].write(rows)
        if len(self.files) > 1 and not self.config.sort_by:
            while sum(f.buffered for _, f in self.files.values()) > self.row_group_bytes:
                max((f for _, f in self.files.values()), key=lambda f: f.buffered).flush_buffer()

    def seal(self) -> None:
        """Hand every buffered row to the encoder: the range is read."""
        for _, f in self.files.values():
            f.flush_buffer()

    def close(self, metadata: dict[str, str]) -> list[WrittenFile]:
        """Close every file (in folder order), adding ``metadata`` to each."""
        out = []
        for folder, (temp, f) in sorted(self.files.items()):
            size, footer = f.close({**metadata, "deltaflush.rows": str(f.rows),
                                    "deltaflush.partition": folder})
            out.append(WrittenFile(folder, temp, size, f.rows, footer))
        self.files.clear()
        return out

    def abort(self) -> list[str]:
        temps = []
        for temp, f in self.files.values():
            try:
                f.abort()
            except Exception:  # noqa: BLE001 - best effort, the temp file is discarded anyway
                pass
            temps.append(temp)
        self.files.clear()
        return temps
