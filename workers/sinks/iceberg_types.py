"""Arrow types in Iceberg tables: which type each column is written as, and its field IDs.

Iceberg holds fewer types than Arrow. A range is written with each column converted to the
nearest Iceberg type that holds every value *losslessly*, checked value by value
(``pyarrow`` casts with ``safe=True``):

===============================  ====================================================
Arrow                            written as (Iceberg)
===============================  ====================================================
int8, int16, int32, uint8,       int32 (int)
uint16
int64, uint32                    int64 (long)
uint64                           int64 (long); a value over 2**63-1 is refused at
                                 append, a dead letter at a flush
                                 (``producer.typepolicy``)
float16                          float32 (float)
timestamp s/ms/us, any zone      timestamp us (timestamp, or timestamptz with a zone)
timestamp ns                     timestamp us; a value with nanoseconds fails the cast
time32, time64                   time64 us (time); nanoseconds fail the cast
date64                           date32 (date)
decimal256 (precision <= 38)     decimal128 (decimal)
string/binary views              large_string / large_binary (string / binary)
dictionary                       its value type
null (a column never set yet)    left out of the files until it gets a type
list, large_list, fixed list     list; struct; map: their children as above
===============================  ====================================================

Anything else (durations, intervals, unions, decimals over 38 digits) has no Iceberg type:
``append`` refuses it and a flush's decoding sets such an entry aside as a dead letter
(``producer.typepolicy.format_refusal``); should one reach this module anyway,
``LakeSchemaError`` says which column, and the flusher marks the table stuck (a value
that fails its cast does the same) rather than changing data silently. Every column is
optional in Iceberg, so that later schema changes stay legal; but a map's key, which Arrow
never lets be null, is required in the Iceberg schema and in the files alike.

Each field of the file schema carries its Iceberg field ID (``PARQUET:field_id`` in the
Arrow field metadata, which pyarrow writes into the Parquet schema): Iceberg readers
resolve columns by ID, not by name.
"""

from __future__ import annotations

import pyarrow as pa
from pyiceberg.schema import Schema
from pyiceberg.types import ListType, MapType, NestedField, StructType

from producer.errors import LakeSchemaError

FIELD_ID = b"PARQUET:field_id"


def lake_schema(schema: pa.Schema, table: str) -> pa.Schema:
    """``schema`` with each column's type converted for Iceberg (see the module doc), all
    nullable, null-typed columns left out; no field IDs yet."""
    return pa.schema([pa.field(f.name, _lake_type(f.type, f.name, table), nullable=True)
                      for f in schema if not pa.types.is_null(f.type)])


def _lake_type(t: pa.DataType, column: str, table: str) -> pa.DataType:
    if pa.types.is_integer(t):
        small = t.bit_width < 32 or (t.bit_width == 32 and pa.types.is_signed_integer(t))
        return pa.int32() if small else pa.int64()
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", "UTC" if t.tz else None)
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_date64(t):
        return pa.date32()
    if pa.types.is_decimal256(t) and t.precision <= 38:
        return pa.decimal128(t.precision, t.scale)
    if pa.types.is_string_view(t):
        return pa.large_string()
    if pa.types.is_binary_view(t):
        return pa.large_binary()
    if pa.types.is_dictionary(t):
        return _lake_type(t.value_type, column, table)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)):
        item = pa.field("element", _lake_type(t.value_type, column, table), nullable=True)
        return pa.large_list(item) if pa.types.is_large_list(t) else pa.list_(item)
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _lake_type(f.type, column, table), nullable=True)
                          for f in t if not pa.types.is_null(f.type)])
    if pa.types.is_map(t):
        return pa.map_(pa.field("key", _lake_type(t.key_type, column, table), nullable=False),
                       pa.field("value", _lake_type(t.item_type, column, table)))
    if (pa.types.is_boolean(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_date32(t) or pa.types.is_decimal128(t)):
        return t
    raise LakeSchemaError(
        f"table {table!r}: column {column!r} has type {t}, which an Iceberg table cannot "
        "hold; append it as another type (e.g. a duration as int64 microseconds) to a new "
        "table, or use format='parquet'")


def with_field_ids(schema: pa.Schema, iceberg: Schema, table: str) -> pa.Schema:
    """``schema`` (a ``lake_schema``) with the field IDs of the table's Iceberg schema, and
    each primitive column widened to the Iceberg column's type where the table's column is
    wider (an int column the table has since promoted to long)."""
    fields = []
    for f in schema:
        try:
            nested = iceberg.find_field(f.name)
        except ValueError as exc:
            raise LakeSchemaError(f"table {table!r}: column {f.name!r} is not in the Iceberg "
                                  "table's schema") from exc
        fields.append(_with_id(f, nested, table))
    return pa.schema(fields)


def _with_id(f: pa.Field, nested: NestedField, table: str, nullable: bool = True) -> pa.Field:
    """``f`` with the field ID of ``nested`` (its children's too), nullable but for a map's
    key: Arrow map keys are never null (and Iceberg map keys are required)."""
    t, it = f.type, nested.field_type
    if isinstance(it, StructType) and pa.types.is_struct(t):
        by_name = {n.name: n for n in it.fields}
        t = pa.struct([_with_id(child, by_name.get(child.name) or _missing(
            f.name, child.name, table), table) for child in t])
    elif isinstance(it, ListType) and (pa.types.is_list(t) or pa.types.is_large_list(t)):
        element = _with_id(t.value_field, it.element_field, table)
        t = pa.large_list(element) if pa.types.is_large_list(t) else pa.list_(element)
    elif isinstance(it, MapType) and pa.types.is_map(t):
        t = pa.map_(_with_id(t.key_field, it.key_field, table, nullable=False),
                    _with_id(t.item_field, it.value_field, table))
    else:
        t = _promoted(t, str(it))
    return pa.field(f.name, t, nullable=nullable,
                    metadata={FIELD_ID: str(nested.field_id).encode()})


def _missing(parent: str, child: str, table: str) -> NestedField:
    raise LakeSchemaError(f"table {table!r}: field {parent}.{child} is not in the Iceberg "
                          "table's schema")


def _promoted(t: pa.DataType, iceberg_type: str) -> pa.DataType:
    """The Arrow type of a primitive written into an Iceberg column of ``iceberg_type``."""
    if iceberg_type == "long" and pa.types.is_int32(t):
        return pa.int64()
    if iceberg_type == "double" and pa.types.is_float32(t):
        return pa.float64()
    if iceberg_type.startswith("decimal(") and pa.types.is_decimal128(t):
        precision, scale = (int(x) for x in iceberg_type[8:-1].split(","))
        return pa.decimal128(precision, scale)
    return t


def conform(data: pa.Table, file_schema: pa.Schema, table: str) -> pa.Table:
    """``data`` in ``file_schema``: columns in the file schema's order (null-typed ones left
    out), cast where the type differs. Free when nothing but the field IDs differ. Raises
    ``LakeSchemaError`` if a value does not fit (safe cast)."""
    columns = []
    for f in file_schema:
        column = data.column(f.name)
        if not column.type.equals(f.type):
            try:
                column = column.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise LakeSchemaError(
                    f"table {table!r}: a value of column {f.name!r} ({data.column(f.name).type})"
                    f" does not fit the Iceberg table's type {f.type} without loss: {exc}. "
                    "The range is left in Redis; fix the data (`deltaflush dead` cannot "
                    "help here: the entry decodes) or use a new table") from exc
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=file_schema)
