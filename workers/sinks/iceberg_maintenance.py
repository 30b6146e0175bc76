"""Maintenance of deltaflush's Iceberg tables: describe, compact, expire snapshots, remove
orphan files. ``IcebergSink`` exposes these as the ``Maintainable`` protocol.

* **Compaction** bin-packs the small files (under half ``target_file_bytes``, on disk) of
  each partition into files up to the target, read through pyiceberg (so older files are
  read in the current schema) and written by deltaflush's streaming writer, then swaps them
  in one overwrite snapshot (pyiceberg 0.12 cannot write a ``replace`` one): it deletes
  exactly the files it read and adds the ones it wrote, so readers see the same rows
  before and after, never both. It runs while flushes go on: a flush committed meanwhile
  fails its commit (the branch moved), and the compaction is rebuilt on the new snapshot,
  provided every file it rewrote is still live (pyiceberg validates that too); otherwise
  it gives up this round. The watermark of each stream is a table property, which the swap
  leaves as it is.
* **Snapshot expiry** drops snapshots older than ``snapshot_retention_s`` (never the
  current one) from the metadata. It deletes no file.
* **Orphan removal** deletes files under the table's location that neither the current
  metadata, the metadata log, nor any live snapshot references, and that are older than
  ``orphan_retention_s``: a flush in progress stages young files, and a flush commits a
  staged file only while it is younger than half that retention (``IcebergSink.commit``).
"""

from __future__ import annotations

import logging
import posixpath
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from producer.errors import CatalogUnavailable
from producer.tablecfg import TableConfig
from workers.failpoints import failpoint
from workers.writer import Encoder, ParquetFile

from . import Compaction, Expiry, Orphans, TableInfo
from .iceberg import COMMIT_TRIES, WATERMARK, catalog_errors, data_file, fs_path
from .iceberg_types import conform, lake_schema, with_field_ids

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

    from .iceberg import IcebergSink

log = logging.getLogger(__name__)

#: Groups of small files one compaction rewrites at most (the next run takes the rest).
MAX_GROUPS = 32


def target_bytes(sink: IcebergSink, config: TableConfig) -> int:
    return config.target_file_bytes or sink.settings.max_file_bytes


def live_files(table: Table) -> Iterator[tuple[DataFile, bool]]:
    """Every file the current snapshot holds, and whether it is a delete file."""
    from pyiceberg.manifest import ManifestContent

    snapshot = table.current_snapshot()
    if snapshot is None:
        return
    for manifest in snapshot.manifests(table.io):
        deletes = manifest.content == ManifestContent.DELETES
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            yield entry.data_file, deletes


def _loaded(sink: IcebergSink, name: str) -> Table | None:
    return sink.load(name)


def describe(sink: IcebergSink, name: str, config: TableConfig) -> TableInfo:
    try:
        table = _loaded(sink, name)
        if table is None:
            return TableInfo("iceberg", None, 0, 0, 0, 0, {"exists": False})
        small = target_bytes(sink, config) / 2
        files = [f for f, deletes in live_files(table) if not deletes]
    except catalog_errors() as exc:
        raise CatalogUnavailable(f"describing Iceberg table {name!r}: {exc}") from exc
    snapshot = table.current_snapshot()
    return TableInfo(
        format="iceberg", snapshot=str(snapshot.snapshot_id) if snapshot else None,
        files=len(files), small_files=sum(1 for f in files if f.file_size_in_bytes < small),
        rows=sum(f.record_count for f in files),
        bytes=sum(f.file_size_in_bytes for f in files),
        details={"snapshots": len(table.snapshots()),
                 "metadata": table.metadata_location,
                 "watermarks": {k[len(WATERMARK):]: v for k, v in table.properties.items()
                                if k.startswith(WATERMARK)}})


def plan(table: Table, target: int) -> list[list[DataFile]]:
    """Groups of small files of one partition each, in the order they were written, each
    under ``target`` bytes together and of two files at least."""
    by_partition: dict[Any, list[DataFile]] = defaultdict(list)
    for f, deletes in live_files(table):
        if deletes:
            return []  # rows deleted by another writer: left to that writer's tools
        if f.file_size_in_bytes < target / 2:
            by_partition[(f.spec_id, repr(f.partition))].append(f)
    groups: list[list[DataFile]] = []
    for files in by_partition.values():
        group: list[DataFile] = []
        size = 0
        for f in sorted(files, key=lambda f: f.file_path):
            if group and size + f.file_size_in_bytes > target:
                groups.append(group)
                group, size = [], 0
            group.append(f)
            size += f.file_size_in_bytes
        groups.append(group)
    return [g for g in groups if len(g) > 1][:MAX_GROUPS]


def compact(sink: IcebergSink, name: str, config: TableConfig) -> Compaction:
    """Rewrite small files into files near the target, in one snapshot (see the module
    doc). Returns the files read and written, and the new snapshot."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    table = _loaded(sink, name)
    if table is None:
        return {"compacted": 0, "written": 0}
    try:
        groups = plan(table, target_bytes(sink, config))
    except catalog_errors() as exc:
        raise CatalogUnavailable(f"planning compaction of {name!r}: {exc}") from exc
    if not groups:
        return {"compacted": 0, "written": 0}
    written: list[DataFile] = []
    try:
        for group in groups:
            written.append(_rewrite(sink, table, group, config))
        failpoint("lake.compacted")
        old = [f for g in groups for f in g]
        for attempt in range(COMMIT_TRIES):
            txn = table.transaction()
            with txn.update_snapshot(snapshot_properties={
                    "deltaflush.operation": "compact"}).overwrite() as swap:
                for f in old:
                    swap.delete_data_file(f)
                for f in written:
                    swap.append_data_file(f)
            try:
                new = txn.commit_transaction()
                break
            except CommitFailedException:
                time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** attempt)))
                found = _loaded(sink, name)
                if found is None:
                    raise
                table = found
        else:
            raise CommitFailedException(f"{COMMIT_TRIES} commits in a row met another commit")
    except (CommitFailedException, ValidationException) as exc:
        # did not land: what this run wrote is nobody's
        for f in written:
            sink.storage.discard(fs_path(f.file_path))
        log.warning("compaction of %s gave up this round: %s", name, exc)
        return {"compacted": 0, "written": 0, "error": str(exc)}
    except catalog_errors() as exc:  # the outcome may be unknown: orphan removal cleans up
        raise CatalogUnavailable(f"compaction of Iceberg table {name!r}: {exc}") from exc
    except BaseException:
        for f in written:
            sink.storage.discard(fs_path(f.file_path))
        raise
    snapshot = new.current_snapshot()
    result: Compaction = {
        "compacted": len(old), "written": len(written),
        "bytes_read": sum(f.file_size_in_bytes for f in old),
        "bytes_written": sum(f.file_size_in_bytes for f in written),
        "snapshot": str(snapshot.snapshot_id) if snapshot else None, "attempts": attempt + 1}
    log.info("compacted %s: %d files into %d", name, len(old), len(written))
    return result


def _rewrite(sink: IcebergSink, table: Table, group: list[DataFile],
             config: TableConfig) -> DataFile:
    """One new file with the rows of ``group`` (one partition), in the current schema."""
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan
    from pyiceberg.table import FileScanTask

    metadata = table.metadata
    iceberg_schema = table.schema()
    spec = table.specs()[group[0].spec_id]
    folder = posixpath.dirname(fs_path(group[0].file_path))
    path = posixpath.join(folder, f"compact-{uuid.uuid4().hex}.parquet")
    scan = ArrowScan(metadata, table.io, iceberg_schema, AlwaysTrue())
    out: ParquetFile | None = None
    file_schema: pa.Schema | None = None
    with Encoder() as encoder:
        try:
            for f in group:  # one file at a time: memory holds one small file at most
                for batch in scan.to_record_batches([FileScanTask(f)]):
                    data = pa.Table.from_batches([batch])
                    if out is None:
                        file_schema = with_field_ids(lake_schema(data.schema, table.name()[-1]),
                                                     iceberg_schema, table.name()[-1])
                        out = ParquetFile(sink.storage.open_temp(path), file_schema,
                                          sink.row_group_bytes,
                                          replace(config, statistics=True), encoder, 1)
                    assert file_schema is not None
                    out.write(conform(data, file_schema, table.name()[-1]))
            if out is None:
                raise ValueError(f"the files to compact hold no rows: {group[0].file_path}")
            size, footer = out.close({"deltaflush.compacted_from": str(len(group))})
        except BaseException:
            if out is not None:
                out.abort()
            sink.storage.discard(path)
            raise
    sink.storage.sync(path)
    return data_file(metadata, spec, sink.uri(path), size, footer)


def expire_snapshots(sink: IcebergSink, name: str, config: TableConfig) -> Expiry:
    """Drop snapshots older than the retention from the metadata (files stay)."""
    from pyiceberg.exceptions import CommitFailedException

    cutoff = datetime.fromtimestamp(time.time() - config.snapshot_retention_s, UTC)
    for attempt in range(COMMIT_TRIES):
        table = _loaded(sink, name)
        if table is None:
            return {"expired": 0}
        current = table.current_snapshot()
        old = [s.snapshot_id for s in table.snapshots()
               if s.timestamp_ms < cutoff.timestamp() * 1000
               and (current is None or s.snapshot_id != current.snapshot_id)]
        if not old:
            return {"expired": 0}
        try:
            table.maintenance.expire_snapshots().older_than(cutoff).commit()
            return {"expired": len(old)}
        except CommitFailedException:
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** attempt)))
        except catalog_errors() as exc:
            raise CatalogUnavailable(f"expiring snapshots of {name!r}: {exc}") from exc
    raise CatalogUnavailable(f"expiring snapshots of {name!r} kept meeting other commits")


def referenced(table: Table) -> set[str]:
    """Every file the table's metadata needs: metadata files (current and logged), and the
    manifest lists, manifests, data and delete files of every live snapshot, statistics.
    (A manifest's entry of a file *deleted* by its snapshot does not count: the snapshot
    before, if still live, lists that file itself.)"""
    paths = {table.metadata_location}
    paths.update(e.metadata_file for e in table.metadata.metadata_log)
    paths.update(s.statistics_path for s in table.metadata.statistics)
    paths.update(s.statistics_path for s in table.metadata.partition_statistics)
    manifests = {}
    for snapshot in table.snapshots():
        paths.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            manifests[manifest.manifest_path] = manifest
    for path, manifest in manifests.items():
        paths.add(path)
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            paths.add(entry.data_file.file_path)
    return {fs_path(p) for p in paths}


def remove_orphans(sink: IcebergSink, name: str, config: TableConfig) -> Orphans:
    """Delete files under the table's location that nothing references and that are older
    than the orphan retention (see the module doc)."""
    try:
        table = _loaded(sink, name)
        if table is None:
            return {"removed": 0}
        cutoff = time.time() - config.orphan_retention_s
        # list first: a file written after the listing is young anyway
        selector = pafs.FileSelector(fs_path(table.location()), recursive=True,
                                     allow_not_found=True)
        candidates = [info for info in sink.storage.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.mtime is not None
                      and info.mtime.timestamp() < cutoff]
        if not candidates:
            return {"removed": 0}
        keep = referenced(table)
    except catalog_errors() as exc:
        raise CatalogUnavailable(f"listing orphans of {name!r}: {exc}") from exc
    removed = 0
    for info in candidates:
        if info.path not in keep:
            sink.storage.discard(info.path)
            removed += 1
    if removed:
        log.info("removed %d orphan files of %s", removed, name)
    return {"removed": removed}
