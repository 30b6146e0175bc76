"""Where a committed range goes: the sink seam.

A sink stages a range's rows into files while the range is read (``stage``), then commits
them (``commit``) idempotently, keyed by the range: committing a range that the sink holds
already (a retried or a zombie commit) changes nothing. It can tell the last range it
committed for a stream (``last_committed``). ``discard`` removes staged files that will not
be committed.

Implementations: ``folder`` (Parquet files in a folder, the ``parquet`` format), ``iceberg``
(an Apache Iceberg table in a catalog) and ``memory`` (for tests, like dramatiq's stub
broker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

import pyarrow as pa

from producer.settings import Settings
from producer.tablecfg import TableConfig
from workers.sources import Range

if TYPE_CHECKING:
    from workers.storage import Storage
    from workers.writer import Encoder, FileSet


@dataclass(frozen=True)
class StageStart:
    """What a sink needs to start staging a range: the table, the range's first entry, the
    flusher's fencing token (temporary names carry it, so two flushers never share one), the
    schema and configuration the range is written with, the flush's encoder thread, and
    whether the range is read ahead (while the encoder is busy with the one before)."""

    table: str
    first: str
    token: int
    schema: pa.Schema
    config: TableConfig
    encoder: Encoder
    ahead: bool = False
    #: the range's stream among the table's (``wire.Keys.stream``: the table name, or
    #: ``<table>~<shard>`` for a shard of a sharded table)
    stream: str = ""


@dataclass(frozen=True)
class StagedFile:
    """One file written for a range: where it is now (``temp``), where it goes (``final``,
    absolute), its partition folder (``""`` if none), size and rows, and ``metadata``
    (the Parquet footer, for sinks that register statistics)."""

    temp: str
    final: str
    partition: str
    size: int
    rows: int
    metadata: Any = None


@dataclass(frozen=True)
class Staged:
    """A range's files, closed and ready to commit, and the Arrow bytes they hold."""

    range: Range
    files: tuple[StagedFile, ...] = ()
    arrow_bytes: int = 0

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Committed:
    """What a sink commit did: the files now visible (paths as a user would type them), or
    ``already`` if the sink held the range before."""

    paths: tuple[str, ...] = ()
    already: bool = False
    details: dict[str, Any] = field(default_factory=dict)


class Staging(Protocol):
    """A range being staged: ``write`` many times while it is read, ``seal`` once it is
    read, ``close`` once (possibly on another thread) to get the ``Staged`` files."""

    @property
    def rows(self) -> int: ...

    @property
    def arrow_bytes(self) -> int: ...

    def write(self, data: pa.Table) -> None: ...

    def seal(self) -> None: ...

    def close(self, rng: Range) -> Staged: ...

    def abort(self) -> None: ...


class FileStaging:
    """What every sink's staging shares: the ``FileSet`` its range is written into, each
    table passed through ``prepare`` (e.g. conformed to the lake's schema) first."""

    files: FileSet

    def prepare(self, data: pa.Table) -> pa.Table:
        return data

    @property
    def rows(self) -> int:
        return self.files.rows

    @property
    def arrow_bytes(self) -> int:
        return self.files.arrow_bytes

    def write(self, data: pa.Table) -> None:
        self.files.write(self.prepare(data))

    def seal(self) -> None:
        self.files.seal()


class Sink(Protocol):
    """See the module doc."""

    format: str

    def stage(self, start: StageStart) -> Staging: ...

    def commit(self, staged: Staged) -> Committed: ...

    def discard(self, staged: Staged) -> None: ...

    def last_committed(self, table: str, stream: str) -> str | None: ...


@dataclass(frozen=True)
class TableInfo:
    """What ``deltaflush table show`` and ``status`` say about a table in its sink: the
    format, the current snapshot (or version; None for a folder), the data files and how
    many of them are small (under half the size target)."""

    format: str
    snapshot: str | None
    files: int
    small_files: int
    rows: int | None = None
    bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Compaction(TypedDict):
    """What ``Maintainable.compact`` did, the same keys whatever the format."""

    #: data files rewritten (removed from the table) and files written in their place
    compacted: int
    written: int
    bytes_read: NotRequired[int]
    bytes_written: NotRequired[int]
    #: the table's snapshot (Iceberg) or version (Delta) after the compaction
    snapshot: NotRequired[str | None]
    #: commits tried (a conflicting commit is planned again)
    attempts: NotRequired[int]
    #: why a compaction gave up this round (nothing changed; the next run tries again)
    error: NotRequired[str]


class Expiry(TypedDict):
    """What ``Maintainable.expire_snapshots`` did: ``expired`` old snapshots (Iceberg) or
    log versions (Delta: log files cleaned up past the retention) no longer readable."""

    expired: int
    snapshot: NotRequired[str | None]


class Orphans(TypedDict):
    """What ``Maintainable.remove_orphans`` did: ``removed`` files deleted."""

    removed: int
    retention_hours: NotRequired[int]


class Maintainable(Protocol):
    """A sink whose tables are maintained (lake formats). Each call is one atomic commit
    (or none) that readers see whole, runs while flushes go on (a conflict with a flush is
    retried by refreshing the table, never by writing data twice), and never removes a file
    that a live snapshot or an unfinished flush needs. Each returns a small JSON-ready
    summary of one shape for every format (``Compaction``, ``Expiry``, ``Orphans``), which
    ``workers.maintenance``, its stats and the CLI read without knowing the format."""

    def describe(self, table: str, config: TableConfig) -> TableInfo: ...

    def compact(self, table: str, config: TableConfig) -> Compaction:
        """Bin-pack small files up to the size target in one atomic rewrite."""
        ...

    def expire_snapshots(self, table: str, config: TableConfig) -> Expiry: ...

    def remove_orphans(self, table: str, config: TableConfig) -> Orphans: ...


def for_format(fmt: str, storage: Storage, settings: Settings) -> Sink:
    """The sink of table format ``fmt`` (see ``producer.tablecfg.FORMATS``) on ``storage``.
    Lake formats import their libraries only when a table uses them."""
    if fmt == "parquet":
        from .folder import FolderSink

        return FolderSink(storage, settings.max_file_bytes)
    if fmt == "iceberg":
        from .iceberg import IcebergSink

        return IcebergSink(storage, settings)

    if fmt == "delta":
        from .delta import DeltaSink

        return DeltaSink(storage, settings.max_file_bytes)
    raise NotImplementedError(f"table format {fmt!r} has no sink yet")
