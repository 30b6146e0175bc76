"""The fast path of reading small entries: a run of them decoded as one Arrow IPC stream.

Decoding one payload costs about as much as reading it from Redis, whatever its size: one
``open_stream`` parses the schema message, builds a reader and validates a table. For
one-row entries that cost is nearly all of a flush. But the payloads one producer writes for
one schema all start with the very same bytes, the IPC schema message, and end with the same
end-of-stream marker. So a run of consecutive entries sharing that prefix is decoded at once:
the schema message once, then every entry's record batches, concatenated in C++ by
``bytes.join``, then the end marker; one ``open_stream``, one validation. Python touches each
entry only to compare its first bytes and slice it.

Validation stays as strict as decoding one entry at a time (``reading.decode``): the run
decodes to the same rows or it is not used. Whenever the combined stream does not decode,
does not validate, or holds a different number of rows than the entries' ``rows`` fields
add up to, the caller decodes the run entry by entry, which sets each bad entry aside as a
dead letter. A run is only ever formed of entries that:

* start with the same schema message and end with the end-of-stream marker (an entry in a
  different encoding, the Node producer's for instance, starts a run of its own);
* carry a ``rows`` field (the check above needs it);
* are small (``SMALL_BYTES``: for larger ones the cost of one decode is nothing beside the
  data, and the copy that joining makes would cost more than it saves);
* have no dictionary-encoded column: in one stream a record batch can use a dictionary sent
  by the entry before it, which the entry alone lacks; so such a schema is decoded entry by
  entry (``dictionary_free`` tells).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa

from producer.canonical import check_names

#: The end-of-stream marker pyarrow (and every current Arrow writer) ends a stream with.
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
#: Entries larger than this are never put in a run.
SMALL_BYTES = 64 * 1024
#: Runs shorter than this are decoded entry by entry (nothing to gain).
MIN_RUN = 2


def schema_prefix(payload: bytes) -> bytes | None:
    """The first IPC message of ``payload`` (its schema message, in a valid stream), with its
    continuation marker and length; None if ``payload`` cannot start a run."""
    if len(payload) > SMALL_BYTES or not payload.endswith(EOS) or payload[:4] != EOS[:4]:
        return None
    size = int.from_bytes(payload[4:8], "little", signed=True)
    if size <= 0 or 8 + size + len(EOS) > len(payload):
        return None
    return payload[:8 + size]


def runs(payloads: Sequence[bytes | None], rows: Sequence[bytes | None]
         ) -> Iterator[tuple[int, int, bytes | None]]:
    """Split entries into ``(start, end, prefix)``: ``payloads[start:end]`` share the schema
    message ``prefix`` and may be decoded together; ``prefix`` is None for an entry that
    must be decoded alone."""
    n = len(payloads)
    i = 0
    while i < n:
        payload = payloads[i]
        prefix = schema_prefix(payload) if payload is not None and rows[i] else None
        j = i + 1
        if prefix is not None:
            while j < n:
                other = payloads[j]
                if other is None or not rows[j] or len(other) > SMALL_BYTES \
                        or not other.startswith(prefix) or not other.endswith(EOS):
                    break
                j += 1
        if j - i < MIN_RUN:
            prefix = None
        yield i, j, prefix
        i = j


def decode_run(prefix: bytes, payloads: Sequence[bytes], rows: Sequence[bytes]
               ) -> pa.Table | None:
    """The entries ``payloads`` (a run that shares ``prefix``) as one fully validated table,
    or None if they must be decoded one by one (see the module doc). ``MemoryError`` passes:
    it is not the entries' fault."""
    try:
        expected = sum(int(r) for r in rows)
    except ValueError:
        return None
    start = len(prefix)
    end = -len(EOS)
    # slicing copies, but small entries only: cheaper than a memoryview each
    data = b"".join([prefix, *[p[start:end] for p in payloads], EOS])
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        if table.num_rows != expected or not dictionary_free(table.schema):
            return None
        table.validate(full=True)  # the same checks as wire.decode_payload, in C++
        check_names(table.schema)
    except MemoryError:
        raise
    except (pa.ArrowException, OSError, ValueError):
        return None
    # one chunk per column, not one per entry: what comes next (sizing, casting, Parquet
    # encoding) costs per chunk
    return table.combine_chunks()


def dictionary_free(schema: pa.Schema) -> bool:
    """True if no column of ``schema``, at any depth, is dictionary-encoded."""
    return not any(_has_dictionary(field.type) for field in schema)


def _has_dictionary(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        return True
    return any(_has_dictionary(type_.field(i).type) for i in range(type_.num_fields))
