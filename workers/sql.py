"""``deltaflush sql``: a DuckDB query in which each deltaflush table is a view over one
consistent snapshot of its lake and its delta (``Producer.dataset``, docs/reads.md).

Every word of the query that is the name of a deltaflush table (in ``{prefix}:tables``;
case-insensitively, as DuckDB matches names) is registered under that name as a pyarrow
dataset, which DuckDB scans with projection and filter pushdown, as often as the query
needs (a self-join scans it twice). Words, not DuckDB's ``get_table_names``: that one
binds the query and fails on ``JOIN ... USING``; a word that is a table's name but not
used as one only costs a snapshot. Other names are left to DuckDB (its own functions such
as ``read_parquet``, or a clear "does not exist" error).

DuckDB is a dependency of the package, imported only here, when a query runs (the workers
never need it); an install without it (a trimmed image) gets a clear error.
"""

from __future__ import annotations

import re
from typing import Any, cast

import pyarrow as pa

from producer import Producer, wire
from producer.errors import ConfigError, InvalidInput

#: What to install when DuckDB is missing.
INSTALL = "pip install duckdb"


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError as exc:
        raise ConfigError(f"deltaflush sql runs queries with DuckDB, which is not installed: "
                          f"{INSTALL}") from exc
    return duckdb


#: A word of a query that may be a table name.
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def tables_named(sql: str, registry: set[str]) -> list[str]:
    """The deltaflush tables whose names are words of ``sql``: exactly, or, as DuckDB
    matches names, case-insensitively."""
    folded = {t.lower(): t for t in registry}
    words = set(_WORD.findall(sql))
    return sorted({w if w in registry else folded[w.lower()] for w in words
                   if w in registry or w.lower() in folded})


def query(producer: Producer, sql: str) -> pa.Table:
    """Run ``sql`` with every deltaflush table it names as a snapshot; the result."""
    duckdb = _duckdb()
    members = cast(set[bytes], producer.redis.smembers(
        wire.tables_key(producer.settings.key_prefix)))
    registry = {t.decode() for t in members}
    con = duckdb.connect()
    try:
        for name in tables_named(sql, registry):
            con.register(name, producer.dataset(name))
        try:
            result = con.sql(sql)
            return pa.table({}) if result is None else result.fetch_arrow_table()
        except duckdb.Error as exc:
            raise InvalidInput(f"DuckDB: {exc}") from exc
    finally:
        con.close()
