"""Maintenance of Delta tables (``sinks.Maintainable``): compaction, log expiry, vacuum.

Each runs while flushes go on and is one Delta commit (or none) that readers see whole:

* ``compact``: delta-rs ``optimize.compact()`` bin-packs the files under half the size
  target of each partition into files near it, in one commit that removes the small files
  (``dataChange: false``) and adds the new ones. App transactions are table state, carried
  over by every commit, so the record of which ranges the table holds is untouched. A
  flush that commits meanwhile is rebased over it by delta-rs (an append does not conflict
  with a compaction); a compaction that does conflict (a schema change landed meanwhile)
  is planned again from the latest version. No row can appear twice: a flush never
  re-adds a file, and a zombie's commit is refused by the app transaction check.
* ``expire_snapshots``: versions older than ``snapshot_retention_s`` stop being readable:
  the table property ``delta.logRetentionDuration`` follows the policy, a checkpoint is
  written and the log before it is cleaned up (delta-rs also does this after every
  hundredth commit). The checkpoint carries the app transactions.
* ``remove_orphans``: vacuum in full mode removes files no live version references: files
  a compaction removed more than the retention ago, and files nothing ever referenced
  (those of crashed flushes) whose age passes the retention. The retention is the larger of
  ``orphan_retention_s`` and ``snapshot_retention_s`` (rounded up to whole hours, delta-rs's
  unit), so no live snapshot and no unfinished flush loses a file: a flush refuses to
  commit a staged file older than half of ``orphan_retention_s`` (``sinks.delta``).
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import CommitProperties

from producer.tablecfg import TableConfig
from workers.storage import Storage

from . import Compaction, Expiry, Orphans, TableInfo
from .delta_table import location, panics_as_errors

#: Attempts of one maintenance operation that loses to conflicting commits.
MAX_ATTEMPTS = 5
_CODECS = {"zstd": "ZSTD", "snappy": "SNAPPY", "gzip": "GZIP", "lz4": "LZ4_RAW",
           "brotli": "BROTLI", "none": "UNCOMPRESSED"}


class DeltaMaintenance:
    """The ``Maintainable`` half of ``DeltaSink`` (see the module doc)."""

    format = "delta"
    open_table: Any = DeltaTable

    def __init__(self, storage: Storage, max_file_bytes: int) -> None:
        self.storage = storage
        self.max_file_bytes = max_file_bytes

    def target_bytes(self, config: TableConfig) -> int:
        return config.target_file_bytes or self.max_file_bytes

    @staticmethod
    def table_properties(config: TableConfig) -> dict[str, str]:
        """Delta table properties that carry the table's maintenance policy."""
        keep_s = max(config.orphan_retention_s, config.snapshot_retention_s)
        return {"delta.logRetentionDuration":
                f"interval {math.ceil(config.snapshot_retention_s)} seconds",
                "delta.deletedFileRetentionDuration": f"interval {math.ceil(keep_s)} seconds"}

    def _open(self, table: str) -> DeltaTable | None:
        return location(self.storage, table).open(self.open_table)

    @panics_as_errors("describing a Delta table")
    def describe(self, table: str, config: TableConfig) -> TableInfo:
        dt = self._open(table)
        if dt is None:
            return TableInfo(self.format, None, 0, 0, rows=0, bytes=0)
        adds = pa.table(dt.get_add_actions(flatten=True))
        sizes = adds.column("size_bytes").to_pylist()
        records = adds.column("num_records").to_pylist() if adds.num_rows else []
        small = sum(1 for size in sizes if size < self.target_bytes(config) / 2)
        rows = None if any(r is None for r in records) else sum(records)
        return TableInfo(self.format, str(dt.version()), len(sizes), small, rows=rows,
                         bytes=sum(sizes),
                         details={"partition_columns": list(dt.metadata().partition_columns),
                                  "uri": location(self.storage, table).uri})

    @panics_as_errors("compacting a Delta table")
    def compact(self, table: str, config: TableConfig) -> Compaction:
        """Bin-pack small files up to the size target in one commit (see the module doc)."""
        target = self.target_bytes(config)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            dt = self._open(table)
            if dt is None:
                return {"compacted": 0, "written": 0}
            try:
                metrics = dt.optimize.compact(
                    target_size=target, writer_properties=_writer_properties(config),
                    commit_properties=CommitProperties(custom_metadata={
                        "deltaflush.operation": "compact"}))
            except CommitFailedError:
                if attempt == MAX_ATTEMPTS:
                    raise
                continue  # what it wrote is unreferenced: vacuum removes it
            return {"compacted": int(metrics["numFilesRemoved"]),
                    "written": int(metrics["numFilesAdded"]),
                    "bytes_read": _total_size(metrics.get("filesRemoved")),
                    "bytes_written": _total_size(metrics.get("filesAdded")),
                    "snapshot": str(dt.version()),
                    "attempts": attempt}
        raise AssertionError("unreachable")

    @panics_as_errors("expiring the versions of a Delta table")
    def expire_snapshots(self, table: str, config: TableConfig) -> Expiry:
        """Make versions past ``snapshot_retention_s`` unreadable and clean up their log."""
        want = self.table_properties(config)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            dt = self._open(table)
            if dt is None:
                return {"expired": 0}
            have = dt.metadata().configuration
            if all(have.get(k) == v for k, v in want.items()):
                break
            try:
                dt.alter.set_table_properties(want, commit_properties=CommitProperties(
                    custom_metadata={"deltaflush.operation": "retention policy"}))
            except CommitFailedError:
                if attempt == MAX_ATTEMPTS:
                    raise
        dt = self._open(table)
        assert dt is not None
        before = self._log_files(table)
        dt.create_checkpoint()
        dt.cleanup_metadata()
        after = self._log_files(table)
        return {"expired": max(0, before - after), "snapshot": str(dt.version())}

    @panics_as_errors("removing the orphan files of a Delta table")
    def remove_orphans(self, table: str, config: TableConfig) -> Orphans:
        """Vacuum, in full mode, what no version within the retention references."""
        dt = self._open(table)
        if dt is None:
            return {"removed": 0}
        keep_s = max(config.orphan_retention_s, config.snapshot_retention_s)
        hours = math.ceil(keep_s / 3600)
        removed = dt.vacuum(retention_hours=hours, dry_run=False, full=True,
                            enforce_retention_duration=False,
                            commit_properties=CommitProperties(custom_metadata={
                                "deltaflush.operation": "remove orphans"}))
        return {"removed": len(removed), "retention_hours": hours}

    def _log_files(self, table: str) -> int:
        selector = pafs.FileSelector(posixpath.join(self.storage.table_dir(table),
                                                    "_delta_log"), allow_not_found=True)
        return sum(1 for info in self.storage.fs.get_file_info(selector)
                   if info.type == pafs.FileType.File)


def _total_size(summary: Any) -> int:
    """``totalSize`` of a delta-rs optimize file summary (a dict, or its JSON text)."""
    if isinstance(summary, str):
        summary = json.loads(summary)
    return int((summary or {}).get("totalSize", 0))


def _writer_properties(config: TableConfig) -> WriterProperties:
    """Compacted files are compressed like the table's flushed ones."""
    return WriterProperties(compression=_CODECS[config.compression],  # type: ignore[arg-type]
                            compression_level=config.compression_level)
