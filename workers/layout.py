"""Where each row of a flush goes: Hive-style partition folders from a table's configuration.

``split()`` cuts a batch into one piece per partition it touches and names the folder of
each (``country=de/ts_day=2026-11-24``). Partition columns are not stored in the files, as in
Spark and ``pyarrow.dataset``: readers take them from the folder names. Lake tables keep them
(``keep_partition_columns``): Iceberg readers take every column from the files, and find the
partition in the table's metadata, not in folder names. A null value goes to
Hive's ``__HIVE_DEFAULT_PARTITION__``; characters that are unsafe in a path are escaped as
``%XX`` like Hive does.

It also gives the files their column types: a ``spark_compatible`` table writes types Spark
reads too (``producer.typepolicy.spark_safe``), and each piece ``split()`` returns is
already cast to ``file_schema``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from producer.tablecfg import BUCKETS, TableConfig
from producer.typepolicy import spark_safe

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _same(table: pa.Table) -> pa.Table:
    return table

_UNSAFE = set('"#%\'*/:=?\\\x7f{}[]^') | {chr(c) for c in range(0x20)}


def escape(value: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE else c for c in value)


class Layout:
    def __init__(self, config: TableConfig, schema: pa.Schema,
                 keep_partition_columns: bool = False) -> None:
        self.config = config
        self.columns = [c for c in config.partition_by if c in schema.names]
        time = config.time
        self.time = time if time and time.column in schema.names else None
        self.keep = keep_partition_columns
        self._cast: Callable[[pa.Table], pa.Table] = _same
        if self.keep:  # a lake table: its sink gives the files their types (and field IDs)
            self.file_schema = schema
        else:
            self.file_schema, self._cast = spark_safe(
                pa.schema([f for f in schema if f.name not in self.columns]), config)

    @property
    def partitioned(self) -> bool:
        return bool(self.columns or self.time)

    def split(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """``[(folder, rows)]``: the rows of ``table`` for each partition folder it touches
        (folder ``""`` when the table is not partitioned), partition columns removed unless
        kept."""
        if not self.partitioned:
            return [("", self._cast(table))]
        parts = [self._values(c, table.column(c)) for c in self.columns]
        if self.time:
            parts.append(self._bucket(table.column(self.time.column)))
        folders = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "/")
        if isinstance(folders, pa.ChunkedArray):
            folders = folders.combine_chunks()
        encoded = pc.dictionary_encode(folders)
        data = table if self.keep else table.drop_columns(self.columns)
        out = []
        for index, folder in enumerate(encoded.dictionary.to_pylist()):
            mask = pc.equal(encoded.indices, index)
            out.append((folder, self._cast(data.filter(mask))))
        return out

    @staticmethod
    def _values(name: str, column: pa.ChunkedArray) -> pa.Array:
        text = column.combine_chunks()
        if not pa.types.is_string(text.type):
            text = pc.cast(text, pa.string())
        uniques = pc.unique(text)
        folders = pa.array([f"{name}={HIVE_NULL if v is None else escape(v)}"
                            for v in uniques.to_pylist()], pa.string())
        return pc.take(folders, pc.index_in(text, value_set=uniques, skip_nulls=False))

    def _bucket(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        assert self.time is not None
        if column.type.tz is not None:
            column = pc.cast(column, pa.timestamp(column.type.unit, "UTC"))
        text = pc.strftime(column, format=BUCKETS[self.time.bucket])
        prefix = self.time.name + "="
        return pc.if_else(pc.is_null(text), prefix + HIVE_NULL,
                          pc.binary_join_element_wise(prefix, text, ""))
