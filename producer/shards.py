"""Sharded tables (deltaflush protocol 2, docs/shards.md): which shards a table has, and
which shard each row or batch goes to.

A table configured with ``shards=N`` has N delta streams, each with its own keys in a hash
slot of its own (``wire.Keys(prefix, table, shard)``): shard 0 is the table's own keys,
shard ``i >= 1`` the hash tag ``{<table>~<i>}``. Producers send new batches to shards
``0..N-1``; workers flush every shard below the **largest N the table ever had**, recorded
in ``{prefix}:sharded`` before any producer may use a new shard, so that changing N on a
live table loses and duplicates nothing: a shard a producer no longer writes to is drained
by the workers like any other.

The shard of a row, with a shard key column: ``crc32(canonical bytes of its value) mod N``
(:func:`key_bytes` defines the bytes; every language has CRC-32, the one of zlib, PNG and
Ethernet), so the rows of one key go to one shard, in the order they were appended. Without
a shard key, batches go round-robin over the shards.

:func:`table_shards` is how anything that reads a table (the workers, ``status``,
``p.read``) enumerates its shards.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import scripts, wire
from .errors import ConfigError

#: The most shards a table may have.
MAX_SHARDS = 256
#: The protocol a sharded table requires of its producers (``{T}:protocol`` of each shard).
PROTOCOL = 2

#: Records the largest shard count of a table (``producer/lua/shards_record.lua``).
RECORD = scripts.load("shards_record")


def shards_ever(client: Any, prefix: str, table: str) -> int:
    """The largest number of shards ``table`` ever had (1 if it was never sharded)."""
    return count_of(client.hget(wire.sharded_key(prefix), table))


def count_of(raw: bytes | str | None) -> int:
    """The shard count that ``{prefix}:sharded`` holds for a table (``raw``, as read; an
    asyncio client reads it itself): 1 for a table never sharded."""
    return max(1, int(raw)) if raw else 1


def table_shards(client: Any, prefix: str, table: str) -> list[wire.Keys]:
    """The keys of every shard of ``table`` that may hold data: shard 0 (the table's own
    keys) and, for a table that was ever sharded, every shard below the largest shard
    count it ever had, whatever its count is now."""
    return [wire.Keys(prefix, table, i) for i in range(shards_ever(client, prefix, table))]


def sharded_tables(client: Any, prefix: str) -> dict[str, int]:
    """Every table that was ever sharded, to the largest number of shards it had (one
    ``HGETALL``: what a scheduling round reads for all tables at once)."""
    raw = client.hgetall(wire.sharded_key(prefix))
    return {k.decode(): max(1, int(v)) for k, v in raw.items()}


def all_shards(prefix: str, table: str, sharded: dict[str, int]) -> list[wire.Keys]:
    """``table_shards`` from the result of ``sharded_tables`` (no round trip)."""
    return [wire.Keys(prefix, table, i) for i in range(sharded.get(table, 1))]


def record(client: Any, prefix: str, table: str, shards: int) -> int:
    """Record that ``table`` has ``shards`` shards (keeping the largest count ever); return
    the largest count. Called before the configuration that lets producers use them."""
    return int(RECORD(client, {"sharded": wire.sharded_key(prefix)},
                      {"table": table, "shards": shards}))


# --- the shard of a row --------------------------------------------------------------------

_KEY_TYPES = "an integer, string, binary or boolean column"


def key_type_ok(t: pa.DataType) -> bool:
    """Whether a column of type ``t`` may be a shard key."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_boolean(t))


def check_key(schema: pa.Schema, column: str, table: str) -> None:
    """``ConfigError`` unless ``column`` is a column of ``schema`` that may be a shard key."""
    idx = schema.get_field_index(column)
    if idx < 0:
        raise ConfigError(f"shard_key {column!r}: table {table!r} has no column {column!r}; "
                          f"its columns are {schema.names}")
    if not key_type_ok(schema.field(idx).type):
        raise ConfigError(f"shard_key {column!r} of table {table!r} is a "
                          f"{schema.field(idx).type} column; a shard key must be {_KEY_TYPES}")


def key_bytes(value: Any) -> bytes:
    """The canonical bytes of a shard key value, which its CRC-32 is taken of: a string's
    UTF-8, binary as it is, an integer in ASCII decimal (``-42``), a boolean ``true`` or
    ``false``, and null as no bytes (so nulls go to shard 0)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise TypeError(f"a shard key value cannot be a {type(value).__name__}")


def shard_of(value: Any, shards: int) -> int:
    """The shard of one row whose shard key is ``value``."""
    return zlib.crc32(key_bytes(value)) % shards


def row_shards(column: pa.ChunkedArray | pa.Array, shards: int) -> np.ndarray:
    """The shard of every row, from its shard key ``column``: :func:`shard_of` of each
    value, computed for the whole column at once (:func:`crc32_column`)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return (crc32_column(column) % np.uint32(shards)).astype(np.int64)


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()
#: Rows hashed at once (the padded byte matrix is rows x longest value).
_CRC_ROWS = 65_536


def crc32_column(column: pa.Array) -> np.ndarray:
    """``zlib.crc32(key_bytes(value))`` of every value of ``column`` (an integer, string,
    binary or boolean array), as ``uint32``, vectorised: the values' canonical bytes (Arrow's
    cast of integers and booleans to strings is their ASCII decimal, and ``true``/``false``)
    as a padded byte matrix, the table-driven CRC run one byte position at a time over all
    rows. A null's bytes are none: CRC 0."""
    if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.string())
    if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type):
        column = column.cast(pa.large_binary())
        offset_type: type[np.signedinteger[Any]] = np.int64
    else:
        column = column.cast(pa.binary())
        offset_type = np.int32
    out = np.empty(len(column), dtype=np.uint32)
    for start in range(0, len(column), _CRC_ROWS):
        part = column.slice(start, _CRC_ROWS)
        _, offsets_buf, data_buf = part.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[
            part.offset:part.offset + len(part) + 1].astype(np.int64)
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and \
            data_buf.size else np.zeros(1, dtype=np.uint8)
        lengths = np.diff(offsets)
        if part.null_count:
            lengths = np.where(part.is_null().to_numpy(zero_copy_only=False), 0, lengths)
        crc = np.full(len(part), 0xFFFFFFFF, dtype=np.uint32)
        for j in range(int(lengths.max()) if len(part) else 0):
            live = lengths > j
            byte = data[np.where(live, offsets[:-1] + j, 0)].astype(np.uint32)
            step = _CRC_TABLE[(crc ^ byte) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
            crc = np.where(live, step, crc)
        out[start:start + len(part)] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def split(data: pa.Table, column: str, shards: int) -> list[tuple[int, pa.Table]]:
    """``data`` split by the shard of its rows' ``column`` values: ``(shard, rows)`` for
    every shard that gets rows, each keeping the rows' order."""
    where = row_shards(data.column(column), shards)
    present = np.unique(where)
    if len(present) == 1:
        return [(int(present[0]), data)]
    return [(int(s), data.filter(pa.array(where == s))) for s in present]
