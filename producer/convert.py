"""Turn what applications hand to ``append`` into an Arrow table, and conform it to a table's
schema. Pure functions; no Redis."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from .canonical import check_names, normalize, same_type
from .errors import MISSING, SchemaConflict, UnsupportedData

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
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            raise UnsupportedData(
                f"cannot convert the list of dicts to Arrow: {exc}. Give each key one type "
                "in every row."
            ) from exc
    else:
        raise UnsupportedData(f"append takes {SUPPORTED}, not {type(data).__name__}")
    check_names(table.schema)  # before anything else reads them
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


_INT_BITS = {pa.int8(): 8, pa.int16(): 16, pa.int32(): 32, pa.int64(): 64}
_UINT_BITS = {pa.uint8(): 8, pa.uint16(): 16, pa.uint32(): 32, pa.uint64(): 64}
_FLOAT_BITS = {pa.float16(): 16, pa.float32(): 32, pa.float64(): 64}
_LARGE = {pa.string(): pa.large_string(), pa.binary(): pa.large_binary(),
          pa.utf8(): pa.large_utf8()}


def widens(src: pa.DataType, dst: pa.DataType) -> bool:
    """True if every value of type ``src`` converts to ``dst`` without loss (types of the
    same canonical form, docs/spec.md, convert to each other: a dictionary to its values)."""
    if same_type(src, dst) or pa.types.is_null(src):
        return True
    if pa.types.is_dictionary(src):
        return widens(src.value_type, dst)
    if src in _INT_BITS:
        if dst in _INT_BITS:
            return _INT_BITS[dst] >= _INT_BITS[src]
        return dst in _FLOAT_BITS and _FLOAT_BITS[dst] > _INT_BITS[src]
    if src in _UINT_BITS:
        if dst in _UINT_BITS:
            return _UINT_BITS[dst] >= _UINT_BITS[src]
        if dst in _INT_BITS:
            return _INT_BITS[dst] > _UINT_BITS[src]
        return dst in _FLOAT_BITS and _FLOAT_BITS[dst] > _UINT_BITS[src]
    if src in _FLOAT_BITS:
        return dst in _FLOAT_BITS and _FLOAT_BITS[dst] >= _FLOAT_BITS[src]
    return _LARGE.get(src) == dst


def evolve(schema: pa.Schema, batch: pa.Schema, table_name: str) -> pa.Schema:
    """The table schema that holds both ``schema`` and ``batch`` losslessly (normalized:
    the schema of its canonical form, docs/spec.md).

    Compatible changes: new columns (they become nullable; older rows read as null),
    missing nullable columns (null in this batch), and widening of a column's type (integers
    to wider integers or floats that hold them, float32 to float64, string to large_string).
    Anything else raises ``SchemaConflict`` naming the column.
    """
    fields = []
    for field in schema:
        idx = batch.get_field_index(field.name)
        if idx < 0:
            if not field.nullable:
                raise SchemaConflict(table_name, field.name, f"{field.type} not null", MISSING)
            fields.append(field)
            continue
        other = batch.field(idx)
        if widens(other.type, field.type):
            fields.append(field)
        elif widens(field.type, other.type):
            fields.append(field.with_type(other.type))
        else:
            raise SchemaConflict(table_name, field.name, str(field.type), str(other.type))
    for other in batch:
        if schema.get_field_index(other.name) < 0:
            fields.append(other.with_nullable(True))
    return normalize(pa.schema(fields))


def conform(table: pa.Table, schema: pa.Schema, table_name: str) -> pa.Table:
    """Return ``table`` with exactly ``schema``: columns reordered, missing nullable columns
    filled with nulls, narrower types widened. Raise ``SchemaConflict`` naming the first
    column that cannot be brought to the schema without loss."""
    columns = []
    for field in schema:
        idx = table.schema.get_field_index(field.name)
        if idx < 0:
            if not field.nullable:
                raise SchemaConflict(table_name, field.name, f"{field.type} not null", MISSING)
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        have = table.schema.field(idx)
        column = table.column(idx)
        if not widens(have.type, field.type):
            raise SchemaConflict(table_name, field.name, str(field.type), str(have.type))
        if not field.nullable and column.null_count:
            raise SchemaConflict(
                table_name, field.name, f"{field.type} not null", f"{have.type} with nulls"
            )
        columns.append(column if have.type.equals(field.type) else column.cast(field.type))
    for field in table.schema:
        if schema.get_field_index(field.name) < 0:
            raise SchemaConflict(table_name, field.name, MISSING, str(field.type))
    return pa.Table.from_arrays(columns, schema=schema)
