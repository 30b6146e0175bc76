"""pyiceberg's SQL catalog (SQLite, PostgreSQL), parsing each table metadata file once.

A metadata file never changes once written: every commit writes a new one under a new name,
and the catalog's row points at the current one. pyiceberg parses the current file at every
``load_table``, and ``commit_table`` loads the table again before it applies its updates,
so a flush commit (which loads the table to check its watermark) parsed the same file
twice. The file lists every snapshot the table keeps: at a few hundred snapshots those two
parses were 41% of py-spy's samples of an Iceberg commit (docs/performance.md); not
parsing them took 22% off the CPU commits add to a flush.

``SqlCatalog`` here remembers the metadata parsed from the last few locations, and the
metadata a commit wrote under its new location, and builds a load's ``Table`` from it when
the row points at a location it knows. Everything else (the row read, the compare-and-set
of ``commit_table``) is pyiceberg's: a table another process committed to is at a new
location, parsed afresh. The metadata models are frozen (pyiceberg copies them to change
them), so sharing one between tables is safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import IcebergTables
from pyiceberg.catalog.sql import SqlCatalog as _SqlCatalog
from pyiceberg.table import CommitTableResponse, Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.update import TableRequirement, TableUpdate

#: Parsed metadata files kept per catalog (a worker commits to a few tables at a time; one
#: file of a table with hundreds of snapshots is a few hundred KiB parsed).
KEPT = 16


class SqlCatalog(_SqlCatalog):
    """pyiceberg's ``SqlCatalog``, parsing each metadata file once (see the module doc)."""

    def __init__(self, name: str, **properties: str) -> None:
        super().__init__(name, **properties)
        self._parsed: OrderedDict[str, TableMetadata] = OrderedDict()
        self._parsed_lock = threading.Lock()

    def _convert_orm_to_iceberg(self, orm_table: IcebergTables) -> Table:
        location = orm_table.metadata_location or ""
        with self._parsed_lock:
            metadata = self._parsed.get(location)
            if metadata is not None:
                self._parsed.move_to_end(location)
        if metadata is None or not orm_table.table_namespace or not orm_table.table_name:
            table = super()._convert_orm_to_iceberg(orm_table)  # parses; raises if malformed
            self._remember(table.metadata_location, table.metadata)
            return table
        return Table(
            identifier=Catalog.identifier_to_tuple(orm_table.table_namespace)
            + (orm_table.table_name,),
            metadata=metadata, metadata_location=location,
            io=self._load_file_io(metadata.properties, location), catalog=self)

    def commit_table(self, table: Table, requirements: tuple[TableRequirement, ...],
                     updates: tuple[TableUpdate, ...]) -> CommitTableResponse:
        response = super().commit_table(table, requirements, updates)
        self._remember(response.metadata_location, response.metadata)
        return response

    def _remember(self, location: str, metadata: TableMetadata) -> None:
        with self._parsed_lock:
            self._parsed[location] = metadata
            self._parsed.move_to_end(location)
            while len(self._parsed) > KEPT:
                self._parsed.popitem(last=False)
