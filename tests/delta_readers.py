"""Independent readers of Delta tables, for the tests: DuckDB's delta extension (a Rust
delta-kernel reader, nothing shared with the delta-rs writer but the protocol), polars and
deltalake.

DuckDB cannot download its extensions here: the ``duckdb-ext-delta`` package ships the
delta extension for the pinned DuckDB version in ``duckdb_ext/extensions/v<version>/
<platform>/``, which is the layout of DuckDB's ``extension_directory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def duckdb_delta() -> Any:
    """A DuckDB connection with the delta extension loaded from the installed package."""
    import duckdb
    import duckdb_ext

    folder = Path(next(iter(duckdb_ext.__path__))) / "extensions"
    con = duckdb.connect(config={"extension_directory": str(folder),
                                 "autoinstall_known_extensions": False})
    con.execute("LOAD delta")
    return con


def duckdb_ids(uri: str | Path) -> list[int]:
    """The ``id`` column of the Delta table at ``uri``, read by DuckDB's ``delta_scan``."""
    con = duckdb_delta()
    try:
        rows = con.execute("SELECT id FROM delta_scan(?)", [str(uri)]).fetchall()
    finally:
        con.close()
    return sorted(r[0] for r in rows)


def polars_ids(uri: str | Path, storage_options: dict[str, str] | None = None) -> list[int]:
    import polars as pl

    frame = pl.scan_delta(str(uri), storage_options=storage_options).select("id").collect()
    return sorted(frame["id"].to_list())


def deltalake_ids(uri: str | Path, storage_options: dict[str, str] | None = None) -> list[int]:
    from deltalake import DeltaTable

    table = DeltaTable(str(uri), storage_options=storage_options).to_pyarrow_table(
        columns=["id"])
    return sorted(table["id"].to_pylist())


def table_exists(uri: str | Path) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(str(uri))
