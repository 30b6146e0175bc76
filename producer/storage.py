"""Shared storage: a local/network folder or anything ``pyarrow.fs.FileSystem.from_uri``
accepts (``s3://bucket/prefix?endpoint_override=...``, ``gs://``, ...).

A file is written under a temporary name that does not end in ``.parquet``, in
``{root}/_deltaflush_tmp/`` outside every table folder, and published by one atomic step:

* local filesystem: ``fsync`` the file, ``rename`` it into place, ``fsync`` the folder;
* object storage: a server-side copy to the final key (the object appears whole or not at
  all), then the temporary object is deleted.

Publishing to a name that exists replaces it atomically. Flushers only ever publish the same
rows under the same name (see ``workers.flusher``), so a replay of a publish is harmless.
"""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from producer import wire
from producer.errors import InvalidTableName

TMP_DIR = "_deltaflush_tmp"


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int


class Storage:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" not in uri or urlparse(uri).scheme == "file":
            local = urlparse(uri).path if uri.startswith("file://") else uri
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = os.path.abspath(local)
            self.local = True
        else:
            self.fs, root = pafs.FileSystem.from_uri(uri)
            self.root = root.rstrip("/")
            self.local = False

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def table_dir(self, table: str) -> str:
        if not wire.valid_table_name(table):  # so never one of our own folders (TMP_DIR)
            raise InvalidTableName(table)
        return posixpath.join(self.root, table)

    def final_path(self, table: str, name: str) -> str:
        return posixpath.join(self.table_dir(table), name)

    def temp_path(self, table: str, name: str, token: int) -> str:
        return posixpath.join(self.root, TMP_DIR, table, f"{name}.{token}.tmp")

    def display(self, path: str) -> str:
        """A path as a user would type it (with the scheme for object storage)."""
        if self.local:
            return path
        return f"{urlparse(self.uri).scheme}://{path}"

    def open_temp(self, path: str) -> pa.NativeFile:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if self.local:
            return pa.OSFile(path, "wb")
        return self.fs.open_output_stream(path)

    def publish(self, temp: str, final: str) -> None:
        """Durably and atomically move a closed temporary file to its final name."""
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fsync_path(temp)
            os.replace(temp, final)
            fsync_path(os.path.dirname(final), directory=True)
        else:
            self.fs.create_dir(posixpath.dirname(final), recursive=True)
            self.fs.copy_file(temp, final)
            self.fs.delete_file(temp)

    def sync(self, path: str) -> None:
        """Make a closed file, written in place, durable with its folder entry: ``fsync``
        both on a local filesystem; nothing on object storage (a completed upload is)."""
        if self.local:
            fsync_path(path)
            fsync_path(os.path.dirname(path), directory=True)

    def discard(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def list_files(self, table: str) -> list[StoredFile]:
        """The published Parquet files of a table (recursively, partition folders included)."""
        selector = pafs.FileSelector(self.table_dir(table), recursive=True, allow_not_found=True)
        return sorted(
            (StoredFile(info.path, info.size) for info in self.fs.get_file_info(selector)
             if info.type == pafs.FileType.File and info.path.endswith(".parquet")),
            key=lambda f: f.path,
        )

    def sweep_temp(self, older_than_s: float) -> int:
        """Delete temporary files older than ``older_than_s`` (left by crashed flushers)."""
        selector = pafs.FileSelector(posixpath.join(self.root, TMP_DIR), recursive=True,
                                     allow_not_found=True)
        cutoff = time.time() - older_than_s
        removed = 0
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or info.mtime is None:
                continue
            if info.mtime.timestamp() < cutoff:
                self.discard(info.path)
                removed += 1
        return removed


def fsync_path(path: str, directory: bool = False) -> None:
    """Flush a file's (or, with ``directory``, a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
