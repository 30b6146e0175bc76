"""One delta entry's payload as rows of the table: decoded, validated, conformed.

The flusher (``workers.sources.reading``) and the producer's reads (``producer.read``) both
decode entries here, so a read shows exactly the rows a flush would write: an entry that
cannot be decoded or fitted to the table's schema is a dead letter for both.
"""

from __future__ import annotations

import pyarrow as pa

from producer import wire
from producer.convert import conform
from producer.errors import SchemaConflict
from producer.typepolicy import format_refusal, refusal, values_refusal


def decode(payload: bytes | None, schema: pa.Schema | None, table: str,
           spark_compatible: bool = True, fmt: str | None = None) -> pa.Table:
    """One entry's payload as a table of ``schema`` (or its own, if None); ``ValueError``
    says why it cannot be flushed. ``MemoryError`` passes: it is not the entry's fault.
    A column of a type the table cannot write (``producer.typepolicy``), or a value a table
    of format ``fmt`` cannot hold (a ``uint64`` over 2**63-1 in a lake table), is such a
    reason."""
    if payload is None:
        raise ValueError(f"entry has no {wire.FIELD_ARROW.decode()!r} field")
    return fit(wire.decode_payload(payload), schema, table, spark_compatible, fmt)


def fit(batch: pa.Table, schema: pa.Schema | None, table: str,
        spark_compatible: bool = True, fmt: str | None = None) -> pa.Table:
    """A decoded, fully validated ``batch`` as a table of ``schema`` (or its own, if None);
    ``ValueError`` says why it cannot be flushed. What ``decode`` does after decoding, for
    a batch decoded otherwise (``workers.sources.runs``)."""
    if batch.schema.metadata:
        batch = batch.replace_schema_metadata(None)
    if schema is not None and not batch.schema.equals(schema):
        try:
            batch = conform(batch, schema, table)
        except SchemaConflict as exc:
            raise ValueError(str(exc)) from exc
        except (pa.ArrowException, TypeError) as exc:
            raise ValueError(f"cannot cast to the table's schema: {exc}") from exc
    refused = refusal(batch.schema, spark_compatible, table)  # a dead letter, not a file
    if refused is not None:
        raise refused
    refused = format_refusal(batch.schema, fmt, table) or values_refusal(batch, fmt, table)
    if refused is not None:
        raise refused
    return batch
