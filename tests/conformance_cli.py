"""The conformance harness's command line (docs/spec.md, Appendix A) over the Python producer.

A reference producer in another language offers the same commands, so that
``tests/test_foreign_producer.py`` runs one set of scenarios against either; run against
this one, the scenarios also test the harness itself. ``python -m tests.conformance_cli``.
"""

from __future__ import annotations

import argparse
import decimal
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis

from producer import Producer, Settings, wire
from producer.append import BACKPRESSURE, CONFLICT, NO_MEMORY, PROTOCOL, queue_append
from producer.errors import Backpressure, SchemaConflict, SchemaRace, UpgradeRequired


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "canonical":
        return _canonical(args.payload)
    settings = Settings(redis_url=args.redis, key_prefix=args.prefix,
                        max_pending_bytes=getattr(args, "max_pending_bytes", 1 << 30))
    with Producer(settings=settings) as p:
        try:
            if args.command == "request-flush":
                p.request_flush(args.table)
                return _out(0, ok=True)
            if args.payload is not None:
                return _append_payload(p, args)
            if args.rows is None:
                raise ValueError("append takes --rows FILE or --payload FILE")
            schema = wire.schema_from_canonical(Path(args.schema).read_bytes())
            # Python's json keeps integers exact, as Appendix A requires
            rows = json.loads(Path(args.rows).read_text(encoding="utf-8"))
            entry_id = p.append(args.table, rows_table(schema, rows))
            return _out(0, ok=True, entry_id=entry_id)
        except SchemaConflict as exc:
            return _out(2, ok=False, error="schema_conflict", column=exc.column,
                        message=str(exc))
        except Backpressure as exc:
            return _out(3, ok=False, error="backpressure", message=str(exc))
        except UpgradeRequired as exc:
            return _out(4, ok=False, error="upgrade_required", required=exc.required,
                        message=str(exc))
        except redis.OutOfMemoryError as exc:  # before RedisError: it is one
            return _out(5, ok=False, error="out_of_memory", message=str(exc))
        except SchemaRace as exc:
            return _out(6, ok=False, error="schema_race", message=str(exc))
        except (ValueError, TypeError, redis.RedisError) as exc:
            return _out(1, ok=False, error="other", message=str(exc))


def rows_table(schema: pa.Schema, rows: Any) -> pa.Table:
    """The batch of Appendix A's ``--rows``: JSON values as the spec reads them."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("--rows must hold a JSON array of objects")
    return pa.Table.from_pylist(
        [{f.name: _value(f.type, row.get(f.name), f.name) for f in schema} for row in rows],
        schema=schema)


def _value(t: pa.DataType, v: Any, where: str) -> Any:
    """A JSON value as pyarrow takes it for type ``t`` (docs/spec.md, Appendix A, Values)."""
    if v is None:
        return None
    if pa.types.is_decimal(t):  # the unscaled integer: 12345 is 123.45 at scale 2
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{where}: a decimal is its unscaled integer, not {v!r}")
        sign, digits, _ = decimal.Decimal(v).as_tuple()
        return decimal.Decimal((sign, digits, -t.scale))  # exact, whatever the precision
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t)):
        if not isinstance(v, str):
            raise ValueError(f"{where}: a binary value is a string (its UTF-8 bytes), not {v!r}")
        return v.encode("utf-8")
    if pa.types.is_map(t):  # an object, or an array of [key, value] pairs
        pairs = list(v.items()) if isinstance(v, dict) else v
        if not isinstance(pairs, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"{where}: a map is an object or an array of [key, value] pairs")
        return [(_value(t.key_type, k, where), _value(t.item_type, x, where))
                for k, x in pairs]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if not isinstance(v, list):
            raise ValueError(f"{where}: a list is a JSON array, not {v!r}")
        return [_value(t.value_type, x, f"{where}.item") for x in v]
    if pa.types.is_struct(t):
        if not isinstance(v, dict):
            raise ValueError(f"{where}: a struct is a JSON object, not {v!r}")
        return {f.name: _value(f.type, v.get(f.name), f"{where}.{f.name}") for f in t}
    return v


def _append_payload(p: Producer, args: argparse.Namespace) -> int:
    """One transaction of the given bytes and claimed schema: no shaping, no retry."""
    if not wire.valid_table_name(args.table):
        raise ValueError(f"invalid table name {args.table!r}")
    keys = wire.Keys(args.prefix, args.table)
    p.redis.sadd(wire.tables_key(args.prefix), args.table)
    pipe = p.redis.pipeline(transaction=True)
    # ARGV 4 (evolves_from) and 6 (dead_id) empty, ARGV 5 --max-pending-bytes
    queue_append(pipe, keys, Path(args.payload).read_bytes(), args.row_count,
                 uuid.uuid4().hex, Path(args.schema).read_bytes(), b"",
                 args.max_pending_bytes)
    code, value, *_ = pipe.execute()[-1]
    if code == CONFLICT:
        return _out(2, ok=False, error="schema_conflict", column=None,
                    message=f"the table's schema is {value.decode()}")
    if code == BACKPRESSURE:
        return _out(3, ok=False, error="backpressure", message=f"{value} bytes pending")
    if code == PROTOCOL:
        return _out(4, ok=False, error="upgrade_required", required=int(value),
                    message=f"the table requires protocol {value}")
    if code == NO_MEMORY:
        return _out(5, ok=False, error="out_of_memory", message=value.decode())
    if code != 1:
        return _out(1, ok=False, error="other", message=value.decode())
    return _out(0, ok=True, entry_id=value.decode())


def _canonical(path: str) -> int:
    try:  # the Schema message alone (docs/spec.md, section 13)
        schema = pa.ipc.open_stream(Path(path).read_bytes()).schema
        canonical = wire.canonical_schema(schema)
    except (pa.ArrowException, OSError, ValueError) as exc:
        # no Schema message, a name that is not UTF-8, a type protocol 1 does not carry...
        print(f"no canonical form for {path}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(canonical + b"\n")
    return 0


def _out(status: int, **result: Any) -> int:
    print(json.dumps(result))
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conformance_cli")
    commands = parser.add_subparsers(dest="command", required=True)
    append = commands.add_parser("append")
    flush = commands.add_parser("request-flush")
    for command in (append, flush):
        command.add_argument("--redis", required=True)
        command.add_argument("--prefix", default="deltaflush")
        command.add_argument("--table", required=True)
    append.add_argument("--schema", required=True)
    append.add_argument("--rows")
    append.add_argument("--payload")
    append.add_argument("--row-count", type=int, default=0)
    append.add_argument("--max-pending-bytes", type=int, default=1 << 30)
    commands.add_parser("canonical").add_argument("--payload", required=True)
    return parser


if __name__ == "__main__":
    sys.exit(main())
