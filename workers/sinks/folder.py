"""The ``parquet`` format: a folder of Parquet files per table, the first sink.

A range's rows are staged into temporary files (one per partition folder it touches) in
``{root}/_deltaflush_tmp/``, outside every table folder, under names that do not end in
``.parquet`` and carry the flusher's token. The commit publishes each file atomically and
durably under a name made from the range, ``part-<first id>_<last id>.parquet`` (for shard
``i >= 1`` of a sharded table, whose stream IDs may equal another shard's:
``part-<first id>_<last id>-s<i>.parquet``): a retried or zombie commit of the same range
writes the same rows to the same names, and the atomic replace of an identical file changes
nothing. That is what makes it idempotent, per shard.
"""

from __future__ import annotations

import posixpath
import re
from itertools import count

import pyarrow as pa

from producer import wire
from workers.failpoints import failpoint
from workers.layout import Layout
from workers.sources import Range
from workers.storage import Storage
from workers.writer import FileSet

from . import Committed, FileStaging, Staged, StagedFile, StageStart

#: Arrow bytes per row group: big enough for scans, small enough to bound memory.
ROW_GROUP_BYTES = 64 * 1024 * 1024

_NAME = re.compile(r"part-(\d{13})-(\d{6})_(\d{13})-(\d{6})(-s[1-9]\d*)?\.parquet$")


def file_name(first: str, last: str, stream: str = "") -> str:
    """The deterministic name of the file holding entries ``first..last`` of ``stream``
    (a shard's suffix for shard ``i >= 1``: ``-s<i>``)."""
    (fms, fseq), (lms, lseq) = wire.parse_id(first), wire.parse_id(last)
    return f"part-{fms:013d}-{fseq:06d}_{lms:013d}-{lseq:06d}{_suffix(stream)}.parquet"


def _suffix(stream: str) -> str:
    shard = wire.shard_of_stream(stream)
    return f"-s{shard}" if shard else ""


def file_metadata(rng: Range) -> dict[str, str]:
    """Key-value metadata of every file of a range: where its rows came from."""
    return {"deltaflush.table": rng.table, "deltaflush.stream": rng.stream,
            "deltaflush.first_id": rng.first, "deltaflush.last_id": rng.last,
            "deltaflush.entries": str(rng.count)}


class FolderStaging(FileStaging):
    """A range staged into temporary Parquet files, one per partition folder."""

    def __init__(self, storage: Storage, start: StageStart, row_group_bytes: int) -> None:
        self.storage = storage
        self.table = start.table
        numbers = count()

        def open_temp(folder: str) -> tuple[str, pa.NativeFile]:
            temp = storage.temp_path(
                start.table, f"part{_suffix(start.stream)}-{start.first}-{next(numbers)}",
                start.token)
            return temp, storage.open_temp(temp)

        self.files = FileSet(Layout(start.config, start.schema), open_temp, row_group_bytes,
                             start.config, start.encoder, start.ahead)

    def close(self, rng: Range) -> Staged:
        name = file_name(rng.first, rng.last, rng.stream)
        arrow_bytes = self.files.arrow_bytes
        written = self.files.close(file_metadata(rng))
        return Staged(rng, tuple(
            StagedFile(temp=f.temp, final=self.storage.final_path(
                self.table, posixpath.join(f.folder, name)), partition=f.folder,
                size=f.size, rows=f.rows) for f in written), arrow_bytes)

    def abort(self) -> None:
        for temp in self.files.abort():
            self.storage.discard(temp)


class FolderSink:
    """Parquet files under ``{storage}/{table}/`` (see the module doc)."""

    format = "parquet"

    def __init__(self, storage: Storage, max_file_bytes: int) -> None:
        self.storage = storage
        self.row_group_bytes = min(ROW_GROUP_BYTES, max_file_bytes)

    def __repr__(self) -> str:
        return f"FolderSink({self.storage.uri!r})"

    def stage(self, start: StageStart) -> FolderStaging:
        return FolderStaging(self.storage, start, self.row_group_bytes)

    def commit(self, staged: Staged) -> Committed:
        """Publish every file of the range; an error leaves the rest staged (``discard``)."""
        paths = []
        for f in staged.files:
            self.storage.publish(f.temp, f.final)
            paths.append(self.storage.display(f.final))
            failpoint("flush.published")
        return Committed(tuple(paths))

    def discard(self, staged: Staged) -> None:
        for f in staged.files:
            self.storage.discard(f.temp)  # a published file is no longer there

    def last_committed(self, table: str, stream: str) -> str | None:
        """The last entry ID of ``stream`` in any published file's name (a listing of the
        table)."""
        last = None
        suffix = _suffix(stream)
        for f in self.storage.list_files(table):
            match = _NAME.search(f.path)
            if match and (match.group(5) or "") == suffix:
                ms, seq = int(match.group(3)), int(match.group(4))
                if last is None or (ms, seq) > last:
                    last = (ms, seq)
        return None if last is None else f"{last[0]}-{last[1]}"
