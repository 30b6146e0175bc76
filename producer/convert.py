"""Turn what applications hand to ``append`` into an Arrow table, and conform it to a table's
schema. Pure functions; no Redis."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from .errors import SchemaConflict, UnsupportedData

SUPPORTED = "a pyarrow.Table, a pyarrow.RecordBatch, a pandas.DataFrame or a list of dicts"


def to_table(data: Any) -> pa.Table:
    """Return ``data`` as a ``pyarrow.Table`` without schema-level metadata.

    Raises ``UnsupportedData`` for other types and for batches without rows or columns.
    """
    if isinstance(data, pa.Table):
        table = data
    elif isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif _is_pandas(data):
        try:
            table = pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise UnsupportedData(
                f"cannot convert the DataFrame to Arrow: {exc}. Give each column one type."
            ) from exc
    elif isinstance(data, list):
        if data and not all(isinstance(row, dict) for row in data):
            raise UnsupportedData(f"a list given to append must hold dicts (rows); got {SUPPORTED}")
        try:
            table = pa.Table.from_pylist(data)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise UnsupportedData(
                f"cannot convert the list of dicts to Arrow: {exc}. Give each key one type "
                "in every row."
            ) from exc
    else:
        raise UnsupportedData(f"append takes {SUPPORTED}, not {type(data).__name__}")
    if table.num_columns == 0 or table.num_rows == 0:
        raise UnsupportedData(
            f"the batch is empty ({table.num_rows} rows, {table.num_columns} columns); "
            "append at least one row with at least one column"
        )
    if table.schema.metadata:
        table = table.replace_schema_metadata(None)
    return table


def _is_pandas(data: Any) -> bool:
    cls = type(data)
    return cls.__name__ == "DataFrame" and cls.__module__.startswith("pandas")


def conform(table: pa.Table, schema: pa.Schema, table_name: str) -> pa.Table:
    """Reorder and cast ``table`` to ``schema`` where that loses nothing; otherwise raise
    ``SchemaConflict`` naming the first column at fault."""
    names = set(table.schema.names)
    for field in schema:
        if field.name not in names:
            raise SchemaConflict(table_name, field.name, str(field.type), "no such column")
    for field in table.schema:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise SchemaConflict(table_name, field.name, "no such column", str(field.type))
        want = schema.field(idx)
        if not field.type.equals(want.type) and not pa.types.is_null(field.type):
            raise SchemaConflict(table_name, field.name, str(want.type), str(field.type))
        if field.nullable and not want.nullable and table.column(field.name).null_count:
            raise SchemaConflict(
                table_name, field.name, f"{want.type} not null", f"{field.type} with nulls"
            )
    if table.schema.names != schema.names:
        table = table.select(schema.names)
    if not table.schema.equals(schema, check_metadata=True):
        table = table.cast(schema)
    return table
