"""Independent readers of lake tables for the tests: DuckDB with its iceberg extension
(loaded from the ``duckdb-ext-*`` packages, since extensions cannot be downloaded here),
the catalog's own SQLite row (read with ``sqlite3``, not pyiceberg), pyiceberg and polars;
``table_ids`` reads a table of any format; and an Iceberg REST catalog server of the tests'
own (``tests/rest_catalog.py``) run as a process, with readers that ask it over plain
HTTP."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from workers.catalog import CATALOG_NAME, OWN_FOLDER


def extension_directory() -> str:
    """Where the ``duckdb-ext-*`` packages put the extensions (``v1.4.4/linux_amd64/``)."""
    import duckdb_ext

    return os.path.join(list(duckdb_ext.__path__)[0], "extensions")


def connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"extension_directory": extension_directory(),
                                 "autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    con.execute("LOAD avro")
    con.execute("LOAD iceberg")
    return con


def default_catalog(root: Path | str) -> Path:
    return Path(root) / OWN_FOLDER / "catalog.db"


def metadata_location(root: Path | str, table: str, namespace: str = "deltaflush",
                      catalog_db: Path | None = None) -> str | None:
    """The table's current metadata file, read from the SQL catalog's ``iceberg_tables``
    row with plain sqlite3 (None if the table does not exist yet)."""
    path = catalog_db or default_catalog(root)
    if not path.exists():
        return None
    with sqlite3.connect(path) as db:
        try:
            row = db.execute(
                "SELECT metadata_location FROM iceberg_tables WHERE catalog_name = ? AND "
                "table_namespace = ? AND table_name = ?",
                (CATALOG_NAME, namespace, table)).fetchone()
        except sqlite3.OperationalError:
            return None
    return None if row is None else str(row[0])


def duckdb_ids(root: Path | str, table: str, column: str = "id") -> list[int]:
    """Every ``column`` value of the table's current snapshot, read by DuckDB's
    ``iceberg_scan`` (sorted; empty if the table does not exist)."""
    location = metadata_location(root, table)
    if location is None:
        return []
    return scan_ids(location, column)


def scan_ids(location: str, column: str = "id") -> list[int]:
    """Every ``column`` value of the snapshot of metadata file ``location``, read by
    DuckDB's ``iceberg_scan`` (sorted)."""
    con = connect()
    try:
        rows = con.execute(f"SELECT {column} FROM iceberg_scan(?)", [location]).fetchall()
    finally:
        con.close()
    return sorted(r[0] for r in rows)


def table_ids(root: Path | str, table: str, fmt: str) -> list[int]:
    """The ids of ``table``'s published rows in format ``fmt`` (sorted; empty if there is no
    table yet), read by a reader independent of its writer: DuckDB's ``iceberg_scan`` or
    ``delta_scan``, or pyarrow's dataset of the Parquet files."""
    from tests import delta_readers
    from tests.conftest import read_ids

    if fmt == "iceberg":
        return duckdb_ids(root, table)
    if fmt == "delta":
        uri = Path(root) / table
        return delta_readers.duckdb_ids(uri) if delta_readers.table_exists(uri) else []
    return read_ids(root, table)


# --- the REST catalog -----------------------------------------------------------------

@dataclass
class RestCatalogServer:
    """``python -m tests.rest_catalog`` running for a test: its base URI (what
    ``DELTAFLUSH_CATALOG_URI`` is set to), the process and its log."""

    uri: str
    prefix: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> tuple[int, dict]:
        """``GET {uri}/v1/{path}`` (prefixed) with plain urllib: status and JSON body."""
        return self.request("GET", f"v1/{self.prefix}/{path}" if self.prefix else f"v1/{path}")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.uri}/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else {}

    def faults(self, **faults: int) -> dict:
        """Set the faults of the next commits (see ``tests/rest_catalog.py``)."""
        return self.request("POST", "_test/faults", faults)[1]

    def metadata_location(self, table: str, namespace: str = "deltaflush") -> str | None:
        """The table's current metadata file, as the catalog answers a plain HTTP load
        (None if it does not exist)."""
        status, body = self.get(f"namespaces/{namespace}/tables/{table}")
        if status == 404:
            return None
        assert status == 200, body
        return str(body["metadata-location"])

    def duckdb_ids(self, table: str, column: str = "id") -> list[int]:
        location = self.metadata_location(table)
        return [] if location is None else scan_ids(location, column)


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/v1/config", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def rest_catalog(tmp_path: Path) -> Iterator[RestCatalogServer]:
    """An Iceberg REST catalog of this test's own (``tests/rest_catalog.py``, with a
    ``prefix`` as production catalogs have) in its own process on a free port, its state in
    ``tmp_path/rest``; stopped after."""
    from tests.conftest import ROOT, free_port, wait_for

    port = free_port()
    log = tmp_path / "rest_catalog.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.rest_catalog", "--port", str(port),
             "--warehouse", str(tmp_path / "rest"), "--prefix", "lake"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(uri) or proc.poll() is not None, 30,
                 "the REST catalog to answer")
        assert proc.poll() is None, log.read_text()
        yield RestCatalogServer(uri, "lake", proc, log)
    finally:
        proc.kill()
        proc.wait(10)
