"""The lake tier of a read: one pinned snapshot of a table in its format, with its watermarks.

A lake snapshot is what a table's format holds at one moment, pinned so that commits made
afterwards (flushes, compactions) do not change it while it is read:

* ``parquet``: a set of published files. Each file is named after the range of stream
  entries it holds (``part-<first>_<last>.parquet``, ``workers.sinks.folder``), so the
  snapshot is "every file whose range ends at or before the watermark"; the watermark
  comes from Redis (the last range the delta trimmed, which was published before it was
  trimmed), given by ``pin``.
* ``iceberg``: a snapshot of the table, and the table property
  ``deltaflush.watermark.<stream>`` of the same metadata version (a flush sets it in the
  very commit that appends its range's files, ``workers.sinks.iceberg``).
* ``delta``: a version of the Delta table, and the app transaction ``deltaflush:<stream>``
  of that version (``workers.sinks.delta``).

``watermarks`` maps each stream of the table to the last entry ID the snapshot holds (None:
nothing of it). ``dataset`` is the snapshot's rows as a pyarrow dataset, which scans
project and filter in the lake reader itself (row groups pruned by their statistics), in
the lake's column types (``schema``).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from producer import wire
from producer.errors import ReadError
from producer.settings import Settings
from producer.storage import Storage
from producer.tablecfg import TableConfig

#: Table property of an Iceberg table: the last entry ID of a stream the table holds.
ICEBERG_WATERMARK = "deltaflush.watermark."
#: The name of a ``parquet`` table's file: the range of entries it holds, and for shard
#: ``i >= 1`` of a sharded table ``-s<i>`` (``workers.sinks.folder.file_name``).
FILE_NAME = re.compile(r"part-(\d{13})-(\d{6})_(\d{13})-(\d{6})(?:-s([1-9]\d*))?\.parquet$")
#: Rows per batch a lake snapshot yields (pyarrow's scanner default is 131072).
BATCH_ROWS = 65_536


def file_range(path: str) -> tuple[int, tuple[int, int], tuple[int, int]] | None:
    """``(shard, (ms, seq), (ms, seq))``: the shard and the range of entries a
    ``parquet`` table's file holds, by its name."""
    match = FILE_NAME.search(path)
    if match is None:
        return None
    fms, fseq, lms, lseq = (int(g) for g in match.groups()[:4])
    return int(match.group(5) or 0), (fms, fseq), (lms, lseq)


def _shard(stream: str) -> int:
    """The shard number of a stream name (``Keys.stream``): 0 for ``events``, 3 for
    ``events~3``."""
    _, sep, shard = stream.partition(wire.SHARD_SEP)
    return int(shard) if sep else 0


class LakeSnapshot(Protocol):
    """A pinned lake snapshot (see the module doc)."""

    #: stream -> the last entry ID the snapshot holds (None: nothing); empty for ``parquet``
    #: until ``pin``
    watermarks: dict[str, str | None]
    #: True when the watermarks come from Redis (``pin``), not from the lake
    pinned_by_redis: bool

    def pin(self, watermarks: dict[str, str | None]) -> None: ...

    def schema(self, written: pa.Schema) -> pa.Schema:
        """The table's schema as this lake holds it, for a table whose files a flush writes
        in ``written``: the lake's column types (a Delta table stores every integer as
        ``long``), ``written``'s for columns it does not have yet."""
        ...

    def dataset(self, schema: pa.Schema) -> ds.Dataset | None:
        """The snapshot's rows as a dataset of ``schema`` (``self.schema(...)``): columns a
        file lacks are null; scans push projections and filters down. None if empty."""
        ...


def batches(dataset: ds.Dataset | None, columns: list[str],
            filter: pc.Expression | None) -> Iterator[pa.RecordBatch]:
    """A dataset's rows, projected and filtered by the scanner, in bounded batches."""
    if dataset is None:
        return
    for batch in dataset.to_batches(columns=columns, filter=filter, batch_size=BATCH_ROWS):
        if batch.num_rows:
            yield batch


def snapshot(fmt: str, storage: Storage, settings: Settings, table: str,
             config: TableConfig, streams: list[str]) -> LakeSnapshot:
    """Pin the current lake snapshot of ``table`` in format ``fmt``."""
    if fmt == "iceberg":
        return IcebergSnapshot(storage, settings, table, streams)
    if fmt == "delta":
        return DeltaSnapshot(storage, table, streams)
    return FolderSnapshot(storage, table, config)


class FolderSnapshot:
    """The published files of a ``parquet`` table up to a watermark set by ``pin``."""

    pinned_by_redis = True

    def __init__(self, storage: Storage, table: str, config: TableConfig) -> None:
        self.storage = storage
        self.table = table
        self.config = config
        self.watermarks: dict[str, str | None] = {}

    def pin(self, watermarks: dict[str, str | None]) -> None:
        self.watermarks = dict(watermarks)

    def files(self) -> list[str]:
        """The files of every range up to the watermark. Those were all published before the
        watermark's range was trimmed; files of later ranges are left out (they may be
        published only in part: one file per partition folder, one after the other)."""
        marks = {_shard(s): wire.parse_id(w)
                 for s, w in self.watermarks.items() if w is not None}
        if not marks:
            return []
        out = []
        for f in self.storage.list_files(self.table):
            rng = file_range(f.path)
            if rng is not None and rng[0] in marks and rng[2] <= marks[rng[0]]:
                out.append(f.path)
        return out

    def schema(self, written: pa.Schema) -> pa.Schema:
        return written

    def dataset(self, schema: pa.Schema) -> ds.Dataset | None:
        paths = self.files()
        if not paths:
            return None
        parts = [schema.field(c) if c in schema.names else pa.field(c, pa.string())
                 for c in self.config.partition_by]
        time = self.config.time
        if time is not None:  # a folder level of its own, not a column of the table
            parts.append(pa.field(time.name, pa.string()))
        partitioning = ds.partitioning(pa.schema(parts), flavor="hive") if parts else None
        return ds.dataset(paths, schema=schema, format="parquet", filesystem=self.storage.fs,
                          partitioning=partitioning,
                          partition_base_dir=self.storage.table_dir(self.table))


def _fs_path(storage: Storage, uri: str) -> str:
    """A file URI as written in a lake's metadata, as a path on ``storage.fs``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return parsed.path if parsed.scheme else uri
    return parsed.netloc + parsed.path


#: Catalogs by (catalog URI, namespace, storage URI): connecting one (an SQLAlchemy engine,
#: the namespace checked) costs more than a read of a small table.
_CATALOGS: dict[tuple[str, str, str], Any] = {}
_CATALOGS_LOCK = threading.Lock()


def _catalog(settings: Settings, storage: Storage) -> Any:
    from producer import catalog

    key = (settings.catalog_uri, settings.catalog_namespace, settings.storage_uri)
    with _CATALOGS_LOCK:
        if key not in _CATALOGS:
            _CATALOGS[key] = catalog.load(settings, storage)
        return _CATALOGS[key]


#: The live data files each manifest lists, by its path (a manifest is never rewritten in
#: place), so a read plans only the manifests committed since the last one.
_MANIFESTS: OrderedDict[str, list[str]] = OrderedDict()
MANIFESTS_REMEMBERED = 4096


def _data_files(lake: Any, snapshot: Any) -> list[str]:
    """The data files of an Iceberg snapshot: what ``scan().plan_files()`` finds for a
    table without delete files, with each manifest read once per process."""
    from pyiceberg.manifest import ManifestContent

    out = []
    for manifest in snapshot.manifests(lake.io):
        if manifest.content != ManifestContent.DATA:
            raise ReadError(f"Iceberg table {lake.name()} has delete files (written by another "
                            "engine); deltaflush reads only tables without them")
        with _CATALOGS_LOCK:
            paths = _MANIFESTS.get(manifest.manifest_path)
            if paths is not None:
                _MANIFESTS.move_to_end(manifest.manifest_path)
        if paths is None:
            paths = [e.data_file.file_path
                     for e in manifest.fetch_manifest_entry(lake.io, discard_deleted=True)]
            with _CATALOGS_LOCK:
                _MANIFESTS[manifest.manifest_path] = paths
                while len(_MANIFESTS) > MANIFESTS_REMEMBERED:
                    _MANIFESTS.popitem(last=False)
        out += paths
    return out


class IcebergSnapshot:
    """The current snapshot of a table's Iceberg table and its watermarks."""

    pinned_by_redis = False

    def __init__(self, storage: Storage, settings: Settings, table: str,
                 streams: list[str]) -> None:
        from pyiceberg.exceptions import NoSuchTableError

        from producer import catalog

        self.storage = storage
        self.files: list[str] = []
        self.watermarks: dict[str, str | None] = {s: None for s in streams}
        try:
            lake = _catalog(settings, storage).load_table(catalog.identifier(settings, table))
        except NoSuchTableError:  # no flush yet
            return
        props = lake.properties
        self.watermarks = {s: props.get(ICEBERG_WATERMARK + s) for s in streams}
        current = lake.current_snapshot()
        if current is not None:
            self.files = [_fs_path(storage, path) for path in _data_files(lake, current)]

    def pin(self, watermarks: dict[str, str | None]) -> None:
        raise AssertionError("an Iceberg snapshot carries its own watermarks")

    def schema(self, written: pa.Schema) -> pa.Schema:
        return written

    def dataset(self, schema: pa.Schema) -> ds.Dataset | None:
        if not self.files:
            return None
        # deltaflush writes no delete files (compaction replaces whole files), and keeps
        # the partition columns in the files: the data files are the table
        return ds.dataset(self.files, schema=schema, format="parquet",
                          filesystem=self.storage.fs)


class DeltaSnapshot:
    """The latest version of a table's Delta table and its watermarks."""

    pinned_by_redis = False

    def __init__(self, storage: Storage, table: str, streams: list[str]) -> None:
        from producer.delta_table import app_id, entry_id, location, panics_as_errors

        self.watermarks: dict[str, str | None] = {s: None for s in streams}
        self._data: ds.Dataset | None = None
        self._reading = f"reading the Delta table of {table!r}"
        with panics_as_errors(self._reading):
            self.lake: Any = location(storage, table).open()
            if self.lake is None:  # no flush yet
                return
            for s in streams:
                version = self.lake.transaction_version(app_id(s))
                self.watermarks[s] = None if version is None else entry_id(version)

    def pin(self, watermarks: dict[str, str | None]) -> None:
        raise AssertionError("a Delta version carries its own watermarks")

    def schema(self, written: pa.Schema) -> pa.Schema:
        if self.lake is None:
            return written
        have = self._dataset().schema
        return pa.schema([have.field(f.name).with_nullable(True) if f.name in have.names
                          else f for f in written])

    def _dataset(self) -> ds.Dataset:
        if self._data is None:
            from producer.delta_table import panics_as_errors

            with panics_as_errors(self._reading):
                self._data = self.lake.to_pyarrow_dataset()  # of the version loaded
        return self._data

    def dataset(self, schema: pa.Schema) -> ds.Dataset | None:
        if self.lake is None:
            return None
        # a column the lake lacks yet (added since its last commit) reads as null
        return self._dataset().replace_schema(schema)
