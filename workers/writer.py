"""A Parquet file writer that streams: ``write()`` many times, ``close()`` once.

Batches are buffered until a row group's worth (``row_group_bytes`` of Arrow data) has
gathered, then encoded; so memory holds about one row group, whatever the file's size.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: Parquet options every writer uses; readable by pyarrow, DuckDB, polars and Spark as-is.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "use_dictionary": True,
    "write_statistics": True,
    "data_page_size": 1024 * 1024,
}
ROW_GROUP_MAX_ROWS = 1_000_000


class ParquetFile:
    """Write one Parquet file to ``sink`` with ``schema``; metadata is added at close."""

    def __init__(self, sink: pa.NativeFile, schema: pa.Schema, row_group_bytes: int) -> None:
        self.sink = sink
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self._writer = pq.ParquetWriter(sink, schema, **PARQUET_OPTIONS)
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self.arrow_bytes = 0

    def write(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.nbytes
        self.rows += table.num_rows
        self.arrow_bytes += table.nbytes
        if self._buffered >= self.row_group_bytes:
            self._flush_buffer()

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        self._writer.write_table(table, row_group_size=ROW_GROUP_MAX_ROWS)

    def close(self, metadata: dict[str, str]) -> int:
        """Encode what is buffered, add ``metadata`` and close; return the file's size."""
        self._flush_buffer()
        self._writer.add_key_value_metadata(metadata)
        self._writer.close()
        size = self.sink.tell()
        self.sink.close()
        return int(size)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.sink.close()
