"""The ``delta`` format: a Delta Lake table at ``{storage}/{table}``, committed with delta-rs.

**Staging.** A range's rows are written by deltaflush's own streaming writer
(``workers.writer``) straight into the table's folder, one file per partition folder, under
names that no other flush can take: ``part-<first id>-t<token>-<random>.parquet``. They are
invisible to readers until a commit adds them to the log.

**Commit.** One Delta commit per range adds every file of the range (with its partition
values and statistics from the Parquet footer) and records the range in the app
transaction of its stream (``deltaflush:<stream>`` -> ``ms << 21 | seq`` of the range's
last entry ID; ``workers.sinks.delta_schema``), plus the range in the commit's metadata.

**Exactly once.** ``commit`` loads the table's latest version and commits nothing if its
app transaction already holds the range (``Committed(already=True)``): a retried commit, a
flusher resuming a range committed just before a crash, a zombie woken after a takeover.
The check and the commit are not atomic by themselves; delta-rs's conflict check makes
them so: a commit whose base version is older than the latest is checked against every
commit since, and one that carries an app transaction of the same stream makes it fail
("Concurrent transaction failed"). On such a conflict (or any other: a schema change, a
table property update) ``commit`` refreshes the table and checks again; it never writes the
data twice. Appends and compactions by others do not conflict; delta-rs rebases over them.

**Files a commit may reference are never deleted here.** A staged file is deleted (by
``discard``, or when the range turns out to be committed already) only if it was never
handed to delta-rs. A commit that failed ambiguously (an I/O error, a crash) may have
landed: its files are left, and vacuum (``remove_orphans``) removes them after the table's
``orphan_retention_s`` if no version references them. Conversely, a zombie must not commit
staged files that vacuum may have removed: ``commit`` checks, just before committing, that
every staged file exists and is younger than half of ``orphan_retention_s``; otherwise it
raises ``StagedFileGone`` (retried: the range is staged afresh).

**Schema.** A range with columns the table lacks first commits a metadata update adding
them (nullable), then its data; a type change delta-rs cannot make marks the table stuck
(``delta_schema``). Partition columns are fixed when the table is created.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

from producer import wire
from producer.storage import fsync_path
from producer.tablecfg import TableConfig
from workers.failpoints import failpoint
from workers.layout import Layout
from workers.sources import Range
from workers.storage import Storage
from workers.writer import FileSet

from . import Committed, FileStaging, Staged, StagedFile, StageStart
from .delta_maintenance import DeltaMaintenance
from .delta_schema import (
    NotStorable,
    app_id,
    conform,
    entry_id,
    file_schema,
    partition_values,
    stats_json,
    table_schema,
    txn_version,
)
from .delta_table import Location, location, panics_as_errors
from .folder import ROW_GROUP_BYTES, file_metadata

log = logging.getLogger(__name__)

#: Delta tables a sink keeps loaded (each holds its live files' log entries in memory),
#: the most recently committed to.
CACHED_TABLES = 16
#: Conflicts one ``commit`` resolves by refreshing the table before it gives up (the task
#: then retries it with backoff, like a storage error).
MAX_CONFLICTS = 20
#: Messages of delta-rs commit errors after which no log entry of this commit exists: a
#: conflict found by its conflict check, or too many versions taken by others. Any other
#: error may have happened after the log entry was written (ambiguous).
_DEFINITE = "Failed to commit transaction"


class StagedFileGone(OSError):
    """A staged file is missing, or so old that vacuum may remove it at any moment (a
    flusher frozen for days): committing it could reference a file that is not there. An
    ``OSError``, so the task retries; the range is staged afresh."""


class CommitConflicts(OSError):
    """``MAX_CONFLICTS`` commits in a row lost to others. Retried by the task."""


@dataclass(frozen=True)
class DeltaFile:
    """The ``metadata`` of a staged file: what its commit needs, its Parquet footer (for the
    statistics) and the Delta table schema and partition columns of its range (what the
    range's schema and configuration give, computed once when staging starts)."""

    footer: Any
    table_schema: pa.Schema
    partition_columns: tuple[str, ...]


class DeltaStaging(FileStaging):
    """A range staged into Parquet files in the table's folder, one per partition folder."""

    def __init__(self, sink: DeltaSink, start: StageStart) -> None:
        self.sink = sink
        self.table = start.table
        self.schema = file_schema(start.schema)
        want, parts = table_schema(start.schema, start.config)
        self.table_schema, self.partition_columns = want, tuple(parts)
        ms, seq = wire.parse_id(start.first)
        prefix = f"part-{ms:013d}-{seq:06d}-t{start.token}"

        def open_file(folder: str) -> tuple[str, pa.NativeFile]:
            name = f"{prefix}-{uuid.uuid4().hex[:8]}.parquet"
            path = sink.storage.final_path(start.table, posixpath.join(folder, name))
            return path, sink.storage.open_temp(path)

        self.files = FileSet(Layout(start.config, self.schema), open_file, sink.row_group_bytes,
                             start.config, start.encoder, start.ahead)

    def prepare(self, data: pa.Table) -> pa.Table:
        return conform(data, self.schema)

    def close(self, rng: Range) -> Staged:
        arrow_bytes = self.files.arrow_bytes
        written = self.files.close(file_metadata(rng))
        files = tuple(StagedFile(temp=f.temp, final=f.temp, partition=f.folder, size=f.size,
                                 rows=f.rows, metadata=DeltaFile(f.metadata, self.table_schema,
                                                                 self.partition_columns))
                      for f in written)
        self.sink.fresh(f.final for f in files)
        return Staged(rng, files, arrow_bytes)

    def abort(self) -> None:
        for path in self.files.abort():  # never closed, so never committed
            self.sink.storage.discard(path)


class DeltaSink(DeltaMaintenance):
    """Delta tables under ``storage`` (see the module doc). Thread-safe.

    ``open_table`` makes the ``DeltaTable`` objects commits go through (``DeltaTable`` or a
    subclass: the tests' seam to hold a commit at the moment it is sent)."""

    format = "delta"

    def __init__(self, storage: Storage, max_file_bytes: int,
                 open_table: Callable[..., DeltaTable] = DeltaTable) -> None:
        super().__init__(storage, max_file_bytes)
        self.row_group_bytes = min(ROW_GROUP_BYTES, max_file_bytes)
        self.open_table = open_table
        self._lock = threading.Lock()
        self._table_locks: dict[str, threading.Lock] = {}
        self._tables: OrderedDict[str, DeltaTable] = OrderedDict()
        #: staged files never handed to delta-rs: the only ones this sink may delete
        self._fresh: set[str] = set()

    def __repr__(self) -> str:
        return f"DeltaSink({self.storage.uri!r})"

    def stage(self, start: StageStart) -> DeltaStaging:
        location(self.storage, start.table)  # refuses an unsafe setup before any write
        return DeltaStaging(self, start)

    def fresh(self, paths: Iterable[str]) -> None:
        """Record staged files as never handed to delta-rs (deletable)."""
        with self._lock:
            self._fresh.update(paths)

    def _take_fresh(self, staged: Staged) -> list[str]:
        """Forget which of ``staged``'s files were fresh; return those that were."""
        with self._lock:
            fresh = [f.final for f in staged.files if f.final in self._fresh]
            self._fresh.difference_update(fresh)
        return fresh

    def discard(self, staged: Staged) -> None:
        """Delete the staged files no commit was attempted with; leave the others (a commit
        that failed ambiguously may have landed) to vacuum."""
        for path in self._take_fresh(staged):
            self.storage.discard(path)

    def last_committed(self, table: str, stream: str) -> str | None:
        with panics_as_errors(f"reading the Delta table of {table!r}"):
            dt = location(self.storage, table).open(self.open_table)
            version = None if dt is None else dt.transaction_version(app_id(stream))
        return None if version is None else entry_id(version)

    # --- commit ----------------------------------------------------------------------------

    def commit(self, staged: Staged) -> Committed:
        """Commit the range's files in one Delta commit, unless the table holds the range
        already (see the module doc)."""
        if not staged.files:  # every entry was a dead letter: nothing to record
            return Committed()
        rng = staged.range
        config = TableConfig.from_json(rng.config)
        staged_as: DeltaFile = staged.files[0].metadata
        want, parts = staged_as.table_schema, list(staged_as.partition_columns)
        version, app = txn_version(rng.last), app_id(rng.stream)
        loc = location(self.storage, rng.table)
        self._make_durable(staged)
        with self._table_lock(rng.table), panics_as_errors(
                f"committing range {rng.first}..{rng.last} to the Delta table of {rng.table!r}"):
            conflicts = 0
            while True:
                dt = self._latest(rng.table, loc, want, parts, config)
                held = dt.transaction_version(app)
                if held is not None and held >= version:
                    for path in self._take_fresh(staged):  # never referenced
                        self.storage.discard(path)
                    log.info("table %s already holds range %s..%s of %s (version %d)",
                             rng.table, rng.first, rng.last, rng.stream, dt.version())
                    return Committed(already=True, details={
                        "format": self.format, "conflicts": conflicts,
                        "read_version": dt.version()})
                try:
                    if self._add_columns(dt, want, parts, rng):
                        continue  # a metadata commit: refresh, check again
                    self._check_staged(staged, config)
                    failpoint("lake.commit")
                    self._take_fresh(staged)  # from here on, the commit may land
                    dt.create_write_transaction(
                        self._adds(staged, want, parts), "append", dt.schema(), parts,
                        commit_properties=CommitProperties(
                            app_transactions=[Transaction(app, version)],
                            custom_metadata=_range_metadata(rng, staged)))
                except CommitFailedError as exc:
                    if _DEFINITE not in str(exc):
                        raise
                    conflicts += 1
                    log.info("table %s: commit of %s..%s conflicted (%s), refreshing",
                             rng.table, rng.first, rng.last, exc)
                    if conflicts >= MAX_CONFLICTS:
                        raise CommitConflicts(
                            f"table {rng.table}: {conflicts} conflicting commits in a row; "
                            "retrying later") from exc
                    continue
                failpoint("lake.committed")
                return Committed(tuple(self.storage.display(f.final) for f in staged.files),
                                 details={"format": self.format, "conflicts": conflicts,
                                          "read_version": dt.version()})

    def _table_lock(self, table: str) -> threading.Lock:
        with self._lock:
            return self._table_locks.setdefault(table, threading.Lock())

    def _latest(self, table: str, loc: Location, want: pa.Schema, parts: list[str],
                config: TableConfig) -> DeltaTable:
        """The table at its latest version, created (empty) if there is none yet."""
        with self._lock:
            dt = self._tables.get(table)
            if dt is not None:
                self._tables.move_to_end(table)
        if dt is not None:
            try:
                dt.update_incremental()
                return dt
            except Exception:  # noqa: BLE001 - e.g. its log was cleaned up: load it anew
                log.info("table %s: reloading the Delta table", table, exc_info=True)
        dt = loc.open(self.open_table)
        if dt is None:
            # An empty version 0, then the range as version 1, so that the range's commit
            # is conflict-checked like every other (delta-rs checks none for version 0).
            # Creators racing (the first flushes of two shards) may each land a creation:
            # delta-rs commits a creation that lost version 0 as the next version without a
            # conflict check. Harmless here (same schema, partitioning and properties; no
            # file or app transaction is touched), and a loser refused instead goes on.
            try:
                DeltaTable.create(loc.uri, want, mode="ignore", partition_by=parts or None,
                                  name=table, configuration=self.table_properties(config),
                                  storage_options=loc.options or None,
                                  commit_properties=CommitProperties(
                                      custom_metadata={"deltaflush.operation": "create"}))
            except CommitFailedError:
                log.info("table %s: created by another flusher meanwhile", table)
            dt = loc.open(self.open_table)
            assert dt is not None
        with self._lock:
            self._tables[table] = dt
            while len(self._tables) > CACHED_TABLES:
                self._tables.popitem(last=False)
        return dt

    def _add_columns(self, dt: DeltaTable, want: pa.Schema, parts: list[str],
                     rng: Range) -> bool:
        """Add the columns of ``want`` the table lacks (one metadata commit); True if it
        did. Raises ``NotStorable`` for what a Delta table cannot take."""
        have = {f.name: f for f in dt.schema().fields}
        table_parts = list(dt.metadata().partition_columns)
        if table_parts != parts:
            raise NotStorable(
                f"table {rng.table!r} is a Delta table partitioned by {table_parts}, and its "
                f"configuration now asks for {parts}: a Delta table's partition columns are "
                "fixed when it is created. Set partition_by/partition_time back, or flush into "
                "a new table")
        missing = []
        for f in DeltaSchema.from_arrow(want).fields:
            if f.name not in have:
                missing.append(f)
            elif repr(have[f.name].type) != repr(f.type):
                raise NotStorable(
                    f"column {f.name!r} of table {rng.table!r} is {have[f.name].type} in the "
                    f"Delta table and {f.type} in range {rng.first}..{rng.last}: delta-rs "
                    "cannot change a column's type. Append it as before, or flush into a new "
                    "table")
        if not missing:
            return False
        dt.alter.add_columns(missing, commit_properties=CommitProperties(custom_metadata={
            "deltaflush.operation": "add columns", "deltaflush.first_id": rng.first}))
        log.info("table %s: added columns %s to the Delta table", rng.table,
                 [f.name for f in missing])
        return True

    def _adds(self, staged: Staged, want: pa.Schema,
              parts: list[str]) -> list[AddAction | RemoveAction]:
        now_ms = int(time.time() * 1000)
        root = self.storage.table_dir(staged.range.table) + "/"
        return [AddAction(f.final[len(root):], f.size,
                          partition_values(f.partition, parts, want), now_ms, True,
                          stats_json(f.metadata.footer, want, parts)) for f in staged.files]

    def _make_durable(self, staged: Staged) -> None:
        """Local files reach the disk before the commit references them (on object
        storage, a closed upload is durable)."""
        if not self.storage.local:
            return
        folders = set()
        for f in staged.files:
            try:
                fsync_path(f.final)
            except FileNotFoundError as exc:
                raise StagedFileGone(f"staged file {f.final} is gone (removed as an orphan?); "
                                     "the range is staged again") from exc
            folders.add(os.path.dirname(f.final))
        for folder in folders:
            fsync_path(folder, directory=True)

    def _check_staged(self, staged: Staged, config: TableConfig) -> None:
        """The orphan guard: every staged file is there and younger than half the
        retention after which vacuum removes unreferenced files."""
        limit_s = config.orphan_retention_s / 2
        infos = self.storage.fs.get_file_info([f.final for f in staged.files])
        now = time.time()
        for info in infos:
            if info.type != pafs.FileType.File:
                raise StagedFileGone(f"staged file {info.path} is gone (removed as an "
                                     "orphan?); the range is staged again")
            if info.mtime is not None and now - info.mtime.timestamp() > limit_s:
                raise StagedFileGone(
                    f"staged file {info.path} was written {now - info.mtime.timestamp():.0f}s "
                    f"ago, past half the table's orphan_retention_s ({config.orphan_retention_s}"
                    "s): vacuum may remove it; the range is staged again")


def _range_metadata(rng: Range, staged: Staged) -> dict[str, Any]:
    """What a Delta commit says about its range (``history()`` shows it)."""
    return {"deltaflush.operation": "flush", "deltaflush.table": rng.table,
            "deltaflush.stream": rng.stream, "deltaflush.first_id": rng.first,
            "deltaflush.last_id": rng.last, "deltaflush.entries": rng.count,
            "deltaflush.rows": staged.rows}


