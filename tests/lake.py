"""Independent readers of lake tables for the tests: DuckDB with its iceberg extension
(loaded from the ``duckdb-ext-*`` packages, since extensions cannot be downloaded here),
the catalog's own SQLite row (read with ``sqlite3``, not pyiceberg), pyiceberg and polars;
``table_ids`` reads a table of any format."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import duckdb

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
