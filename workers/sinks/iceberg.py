"""The ``iceberg`` format: an Apache Iceberg table per deltaflush table, committed exactly once.

The table ``<namespace>.<table>`` (``workers.catalog``) is created by the first range staged
for it, with its data under ``{storage}/{table}``, its schema from the range's Arrow schema
(``iceberg_types``: every type held losslessly, or the table is stuck) and its partition spec
from the table's layout (``partition_by``: identity; ``partition_time``: hour, day or month).
A later range with added columns or widened types evolves the schema first (Iceberg's
``union_by_name``); a changed layout adds a partition spec.

**Staging.** A range is written by deltaflush's streaming writer (``workers.writer``, bounded
memory) straight into ``{table}/data/<partition folder>/`` under names unique to the flusher
(its token and a random suffix): an Iceberg reader sees only files that a snapshot lists, so
no rename is needed. Each field carries its Iceberg field ID; partition columns stay in the
files. On close, each file's Parquet footer becomes a ``DataFile`` with column statistics
(pyiceberg's ``data_file_statistics_from_parquet_metadata``), so readers prune.

**The exactly-once record.** Each commit appends the range's files in one snapshot whose
summary names the range (``deltaflush.stream``, ``deltaflush.first-id``,
``deltaflush.last-id``) and, *in the same metadata commit*, sets the table property
``deltaflush.watermark.<stream>`` to the range's last entry ID. The property is the record
``commit`` checks and ``last_committed`` returns: unlike a snapshot summary it survives
snapshot expiry, compaction and snapshots made by other writers, whatever they carry.

**Idempotent commit.** ``commit`` loads the table fresh, and if the watermark of the range's
stream is at or past the range's last ID, the table holds the range: it commits nothing and
returns ``Committed(already=True)`` (a retry after a crash between the lake commit and the
Redis trim, or a zombie that wakes after a takeover). Otherwise it commits on *that* loaded
snapshot (``iceberg_commit.append``): the commit requires the branch to still be at it
(``AssertRefSnapshotId``; the catalog compares and sets), so any commit in between (another
shard's flush, a compaction, a zombie) fails it with ``CommitFailedException``. A conflict
is retried by loading the table again and checking again, never by re-applying the append
on the new snapshot. pyiceberg's own transactions (used by maintenance) retry by doing
exactly that, so the tables are created with ``commit.retry.num-retries=0`` (and a table
found with another value is set back to it).

**Never referencing a removed file.** Orphan removal deletes only files no snapshot lists
and older than the table's ``orphan_retention_s`` (days; far above any flush). Just before
committing, ``commit`` checks that every staged file still exists and is younger than half
that retention; a zombie that slept longer restages instead. **Never deleting a referenced
file.** ``discard`` deletes staged files only if no commit of them was sent: after a commit
whose outcome is unknown (a lost connection, the catalog down mid-commit), they stay, and
orphan removal takes them later if the commit did not land.

Maintenance (compaction, snapshot expiry, orphan removal, ``describe``) is in
``iceberg_maintenance``; this module only flushes.
"""

from __future__ import annotations

import logging
import posixpath
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from itertools import count
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from producer import wire
from producer.errors import CatalogUnavailable, LakeSchemaError
from producer.settings import Settings
from producer.tablecfg import TableConfig
from workers import catalog as catalogs
from workers.failpoints import failpoint
from workers.layout import Layout
from workers.sources import Range
from workers.storage import Storage
from workers.writer import FileSet

from . import (
    Committed,
    Compaction,
    Expiry,
    FileStaging,
    Orphans,
    Staged,
    StagedFile,
    StageStart,
    TableInfo,
)
from .folder import ROW_GROUP_BYTES, file_metadata
from .iceberg_commit import append
from .iceberg_types import conform, lake_schema, with_field_ids

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.partitioning import PartitionSpec
    from pyiceberg.table import Table

log = logging.getLogger(__name__)

#: Table property holding the last entry ID of a stream that the table holds.
WATERMARK = "deltaflush.watermark."
#: Snapshot summary properties naming the range a flush snapshot holds.
SUMMARY_STREAM, SUMMARY_FIRST, SUMMARY_LAST = (
    "deltaflush.stream", "deltaflush.first-id", "deltaflush.last-id")
#: Properties every table gets. No automatic commit retry (see the module doc); old
#: metadata files are deleted as commits go, the last 100 kept.
TABLE_PROPERTIES = {
    "commit.retry.num-retries": "0",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "100",
    "write.parquet.compression-codec": "zstd",
}
#: Tries of one commit against conflicting commits before the flush is retried later.
COMMIT_TRIES = 12
#: Staged files of sent commits that ``discard`` remembers (see ``IcebergSink._sent``).
SENT_REMEMBERED = 10_000


def watermark(table: Table, stream: str) -> str | None:
    """The last entry ID of ``stream`` that ``table`` holds (None if none)."""
    return table.properties.get(WATERMARK + stream)


def catalog_errors() -> tuple[type[BaseException], ...]:
    """Errors of a catalog call that are worth retrying later (connection, server,
    conflict, storage). Anything else is a bug and surfaces as itself."""
    import requests
    import sqlalchemy.exc
    from pyiceberg import exceptions as ice

    return (ice.CommitFailedException, ice.CommitStateUnknownException, ice.ServerError,
            ice.ServiceUnavailableError, ice.TooManyRequestsError, ice.WaitingForLockException,
            sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError,
            requests.RequestException, OSError)


@dataclass(frozen=True)
class IcebergFile(StagedFile):
    """A staged data file and its Iceberg ``DataFile`` (path, partition, statistics)."""

    data_file: Any = None


def fs_path(uri: str) -> str:
    """A table location or file URI as a path of the storage's filesystem."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return parsed.path
    return parsed.netloc + parsed.path


class IcebergStaging(FileStaging):
    """A range staged into data files of the table, one per partition it touches."""

    def __init__(self, sink: IcebergSink, start: StageStart, table: Table,
                 spec: PartitionSpec, file_schema: pa.Schema) -> None:
        self.sink = sink
        self.table = start.table
        self.metadata = table.metadata
        self.spec = spec
        self.file_schema = file_schema
        self.location = table.location()
        data_dir = posixpath.join(fs_path(self.location), "data")
        numbers = count()
        suffix = uuid.uuid4().hex[:8]

        def open_file(folder: str) -> tuple[str, pa.NativeFile]:
            name = f"part-{start.first}-t{start.token}-{next(numbers)}-{suffix}.parquet"
            path = posixpath.join(data_dir, folder, name)
            return path, sink.storage.open_temp(path)

        # statistics always: readers prune with them, and partitions are read from them
        config = replace(start.config, statistics=True)
        self.files = FileSet(Layout(config, file_schema, keep_partition_columns=True),
                             open_file, sink.row_group_bytes, config, start.encoder,
                             start.ahead)

    def prepare(self, data: pa.Table) -> pa.Table:
        return conform(data, self.file_schema, self.table)

    def close(self, rng: Range) -> Staged:
        arrow_bytes = self.files.arrow_bytes
        written = self.files.close(file_metadata(rng))
        staged = []
        try:
            for f in written:
                self.sink.storage.sync(f.temp)
                staged.append(IcebergFile(
                    temp=f.temp, final=f.temp, partition=f.folder, size=f.size, rows=f.rows,
                    metadata=f.metadata, data_file=data_file(
                        self.metadata, self.spec, self.sink.uri(f.temp), f.size, f.metadata)))
        except BaseException:
            for f in written:
                self.sink.storage.discard(f.temp)
            raise
        return Staged(rng, tuple(staged), arrow_bytes)

    def abort(self) -> None:
        for path in self.files.abort():
            self.sink.storage.discard(path)


def data_file(metadata: Any, spec: PartitionSpec, uri: str, size: int,
              footer: Any) -> DataFile:
    """The Iceberg ``DataFile`` of a written Parquet file, from its footer: column sizes,
    value, null and NaN counts, lower and upper bounds, split offsets, and its partition
    (read from the bounds of the partition columns: one value per file, since each file
    holds one partition; identity columns get untruncated bounds for that)."""
    from pyiceberg.io.pyarrow import (
        compute_statistics_plan,
        data_file_statistics_from_parquet_metadata,
        parquet_path_to_id_mapping,
    )
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

    schema = metadata.schema()
    properties = dict(metadata.properties)
    for field in spec.fields:
        if str(field.transform) == "identity":
            name = schema.find_column_name(field.source_id)
            properties[f"write.metadata.metrics.column.{name}"] = "full"
    stats = data_file_statistics_from_parquet_metadata(
        parquet_metadata=footer,
        stats_columns=compute_statistics_plan(schema, properties),
        parquet_column_mapping=parquet_path_to_id_mapping(schema))
    found = DataFile.from_args(
        content=DataFileContent.DATA, file_path=uri, file_format=FileFormat.PARQUET,
        partition=stats.partition(spec, schema), file_size_in_bytes=size,
        sort_order_id=None, equality_ids=None, key_metadata=None,
        **stats.to_serialized_dict())
    found.spec_id = spec.spec_id  # not a field of the file: the manifest it goes in says it
    return found


class IcebergSink:
    """Iceberg tables in one catalog, data under ``storage`` (see the module doc).
    Thread-safe; one per worker process."""

    format = "iceberg"

    def __init__(self, storage: Storage, settings: Settings,
                 catalog: Catalog | None = None) -> None:
        self.storage = storage
        self.settings = settings
        self.row_group_bytes = min(ROW_GROUP_BYTES, settings.max_file_bytes)
        #: the catalog seam: made from the settings on first use unless given (tests give
        #: one whose ``commit_table`` injects faults)
        self._catalog: Catalog | None = catalog
        self._lock = threading.Lock()
        #: per table: the lake schema and layout last made sure of, and the table then
        self._ready: dict[str, tuple[pa.Schema, TableConfig, Table]] = {}
        #: staged files a commit was sent with (it landed, or its outcome is unknown):
        #: ``discard`` never deletes them. The latest ones only: ``discard`` follows a
        #: failed commit at once.
        self._sent: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"IcebergSink({self.storage.uri!r})"

    # --- the catalog ------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        with self._lock:
            if self._catalog is None:
                try:
                    self._catalog = catalogs.load(self.settings, self.storage)
                except catalog_errors() as exc:
                    raise CatalogUnavailable(f"the Iceberg catalog cannot be reached: {exc}"
                                             ) from exc
            return self._catalog

    def uri(self, path: str) -> str:
        return catalogs.storage_location(self.storage, path)

    def load(self, table: str) -> Table | None:
        """The table as the catalog has it now (None if it does not exist yet)."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table(catalogs.identifier(self.settings, table))
        except NoSuchTableError:
            return None
        except catalog_errors() as exc:
            raise CatalogUnavailable(f"loading Iceberg table {table!r} failed: {exc}") from exc

    # --- staging ----------------------------------------------------------------------

    def stage(self, start: StageStart) -> IcebergStaging:
        lake = lake_schema(start.schema, start.table)
        table, spec = self._prepare(start.table, lake, start.config)
        return IcebergStaging(self, start, table, spec,
                              with_field_ids(lake, table.schema(), start.table))

    def _prepare(self, name: str, lake: pa.Schema, config: TableConfig
                 ) -> tuple[Table, PartitionSpec]:
        """The table, created or evolved to hold ``lake`` with ``config``'s layout, and the
        partition spec of that layout."""
        with self._lock:
            ready = self._ready.get(name)
        if ready is not None and ready[0].equals(lake) and ready[1] == config:
            table = ready[2]
        else:
            try:
                table = self._create_or_evolve(name, lake, config)
            except catalog_errors() as exc:
                raise CatalogUnavailable(f"preparing Iceberg table {name!r} failed: {exc}"
                                         ) from exc
            with self._lock:
                self._ready[name] = (lake, config, table)
        spec = find_spec(table, wanted_fields(config, lake))
        assert spec is not None
        return table, spec

    def _create_or_evolve(self, name: str, lake: pa.Schema, config: TableConfig) -> Table:
        from pyiceberg.exceptions import (
            CommitFailedException,
            TableAlreadyExistsError,
            ValidationError,
        )

        wanted = wanted_fields(config, lake)
        for _ in range(COMMIT_TRIES):
            table = self.load(name)
            try:
                if table is None:
                    return self._create(name, lake, wanted)
                if table.properties.get("commit.retry.num-retries") != "0":
                    self._no_blind_retries(table)
                    continue
                if not covers(table, lake):
                    with table.update_schema() as update:
                        update.union_by_name(lake)
                    continue
                if find_spec(table, wanted) is None:
                    with table.update_spec() as update:
                        for field in table.spec().fields:
                            update.remove_field(field.name)
                        for source, transform, field_name in wanted:
                            update.add_field(source, transform, field_name)
                    continue
                return table
            except (CommitFailedException, TableAlreadyExistsError):
                time.sleep(random.uniform(0, 0.05))
            except (ValueError, ValidationError) as exc:
                raise LakeSchemaError(
                    f"table {name!r}: the Iceberg table cannot take the range's schema or "
                    f"layout: {exc}") from exc
        raise CatalogUnavailable(f"Iceberg table {name!r} kept changing while being prepared")

    def _create(self, name: str, lake: pa.Schema, wanted: list[tuple[str, str, str]]
                ) -> Table:
        location = self.uri(self.storage.table_dir(name))
        ident = catalogs.identifier(self.settings, name)
        with self.catalog.create_table_transaction(
                ident, schema=lake, location=location, properties=TABLE_PROPERTIES) as txn:
            if wanted:
                with txn.update_spec() as update:
                    for source, transform, field_name in wanted:
                        update.add_field(source, transform, field_name)
        log.info("created Iceberg table %s at %s", ".".join(ident), location)
        return self.catalog.load_table(ident)

    # --- committing -------------------------------------------------------------------

    def commit(self, staged: Staged) -> Committed:
        """Append the range's files in one snapshot, unless the table holds the range (see
        the module doc)."""
        from pyiceberg.exceptions import CommitFailedException

        rng = staged.range
        if not staged.files:  # every entry was a dead letter: nothing to hold
            return Committed()
        conflicts = 0
        for attempt in range(COMMIT_TRIES):
            table = self.load(rng.table)
            if table is None:
                raise LakeSchemaError(f"the Iceberg table of {rng.table!r} was dropped while "
                                      "a range was being flushed into it")
            if table.properties.get("commit.retry.num-retries") != "0":
                self._no_blind_retries(table)
                continue
            held = watermark(table, rng.stream)
            if held is not None and wire.parse_id(held) >= wire.parse_id(rng.last):
                if held != rng.last:
                    log.info("table %s holds stream %s up to %s: range %s..%s was committed "
                             "before", rng.table, rng.stream, held, rng.first, rng.last)
                self._drop_unsent(staged)
                return Committed(already=True, details={"conflicts": conflicts})
            self._check_staged(staged)
            summary = {SUMMARY_STREAM: rng.stream, SUMMARY_FIRST: rng.first,
                       SUMMARY_LAST: rng.last, "deltaflush.entries": str(rng.count)}
            failpoint("lake.commit")
            self._remember(staged)
            try:
                snapshot_id, _ = append(
                    table, [f.data_file for f in staged.files],  # type: ignore[attr-defined]
                    {WATERMARK + rng.stream: rng.last}, summary)
            except CommitFailedException:
                # another commit came first: this one did not land; look again
                self._forget(staged)
                conflicts += 1
                failpoint("lake.conflict")
                time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** attempt)))
                continue
            except catalog_errors() as exc:  # the outcome is unknown: keep the files
                raise CatalogUnavailable(f"committing range {rng.first}..{rng.last} to "
                                         f"Iceberg table {rng.table!r} failed: {exc}") from exc
            failpoint("lake.committed")
            return Committed(tuple(self.storage.display(f.final) for f in staged.files),
                             details={"conflicts": conflicts, "snapshot": str(snapshot_id)})
        raise CatalogUnavailable(f"Iceberg table {rng.table!r}: {COMMIT_TRIES} commits of "
                                 f"range {rng.first}..{rng.last} in a row met another commit")

    @staticmethod
    def _no_blind_retries(table: Table) -> None:
        """Turn pyiceberg's own commit retries off on a table that has them (made by another
        tool, or changed): they would re-apply an append without checking the watermark."""
        from pyiceberg.exceptions import CommitFailedException

        try:
            table.transaction().set_properties(TABLE_PROPERTIES).commit_transaction()
        except CommitFailedException:
            pass
        except catalog_errors() as exc:
            raise CatalogUnavailable(f"Iceberg table {table.name()}: {exc}") from exc

    def _check_staged(self, staged: Staged) -> None:
        """Refuse to commit staged files that are gone or older than half the orphan
        retention (orphan removal may take them meanwhile): the retry restages the range."""
        config = TableConfig.from_json(staged.range.config)
        cutoff = time.time() - config.orphan_retention_s / 2
        paths = [f.temp for f in staged.files]
        for info in self.storage.fs.get_file_info(paths):
            if info.type != pafs.FileType.File or (
                    info.mtime is not None and info.mtime.timestamp() < cutoff):
                raise FileNotFoundError(
                    f"staged file {info.path} of range {staged.range.first}.."
                    f"{staged.range.last} is gone or too old to commit; the range is written "
                    "again")

    def _remember(self, staged: Staged) -> None:
        with self._lock:
            for f in staged.files:
                self._sent[f.temp] = None
            while len(self._sent) > SENT_REMEMBERED:
                self._sent.popitem(last=False)

    def _forget(self, staged: Staged) -> None:
        """The commit sent with these files failed for sure (it met another commit)."""
        with self._lock:
            for f in staged.files:
                self._sent.pop(f.temp, None)

    def _drop_unsent(self, staged: Staged) -> None:
        """Delete the files of a range the table held already, unless a commit of them may
        have landed (then they are the ones the table holds)."""
        with self._lock:
            sent = {f.temp for f in staged.files if f.temp in self._sent}
        for f in staged.files:
            if f.temp not in sent:
                self.storage.discard(f.temp)

    def discard(self, staged: Staged) -> None:
        """Delete the staged files of a range that will not be committed, except those a
        commit was sent with: it landed, or its outcome is unknown (they may be in the
        table now); orphan removal takes them later if they are not."""
        with self._lock:
            sent = {f.temp for f in staged.files if self._sent.pop(f.temp, 0) is None}
        for f in staged.files:
            if f.temp in sent:
                log.info("kept %s: a commit of it was sent (orphan removal deletes it later "
                         "if the commit did not land)", f.temp)
            else:
                self.storage.discard(f.temp)

    def last_committed(self, table: str, stream: str) -> str | None:
        found = self.load(table)
        return None if found is None else watermark(found, stream)

    # --- maintenance (iceberg_maintenance) ----------------------------------------------

    def describe(self, table: str, config: TableConfig) -> TableInfo:
        from .iceberg_maintenance import describe

        return describe(self, table, config)

    def compact(self, table: str, config: TableConfig) -> Compaction:
        from .iceberg_maintenance import compact

        return compact(self, table, config)

    def expire_snapshots(self, table: str, config: TableConfig) -> Expiry:
        from .iceberg_maintenance import expire_snapshots

        return expire_snapshots(self, table, config)

    def remove_orphans(self, table: str, config: TableConfig) -> Orphans:
        from .iceberg_maintenance import remove_orphans

        return remove_orphans(self, table, config)


# --- schema and partition spec ---------------------------------------------------------

def covers(table: Table, lake: pa.Schema) -> bool:
    """Whether the table's schema has every column (and nested field) of ``lake``, each at
    least as wide (an int column the table holds as long)."""
    from pyiceberg.exceptions import ResolveError
    from pyiceberg.io.pyarrow import pyarrow_to_schema
    from pyiceberg.schema import promote

    current = table.schema()
    try:
        mine = pyarrow_to_schema(lake, name_mapping=current.name_mapping)
    except (ValueError, KeyError, TypeError):  # a column or field the table lacks
        return False
    for field in mine.fields:
        have = current.find_field(field.field_id).field_type
        if have != field.field_type:
            try:
                promote(field.field_type, have)
            except ResolveError:
                return False
    return True


def wanted_fields(config: TableConfig, lake: pa.Schema) -> list[tuple[str, str, str]]:
    """The partition fields of ``config``'s layout: ``(source column, transform, name)``."""
    fields = [(c, "identity", c) for c in config.partition_by if c in lake.names]
    time = config.time
    if time and time.column in lake.names:
        fields.append((time.column, time.bucket, time.name))
    return fields


def find_spec(table: Table, wanted: list[tuple[str, str, str]]) -> PartitionSpec | None:
    """The table's partition spec with exactly ``wanted`` fields (the current one first)."""
    schema = table.schema()
    specs = [table.spec()] + [s for s in table.specs().values()
                              if s.spec_id != table.spec().spec_id]
    for spec in specs:
        have = [(schema.find_column_name(f.source_id), str(f.transform), f.name)
                for f in spec.fields if str(f.transform) != "void"]
        if have == wanted:
            return spec
    return None
