"""The conformance harness's command line (docs/spec.md, Appendix A) over the Python producer.

A reference producer in another language offers the same commands, so that
``tests/test_foreign_producer.py`` runs one set of scenarios against either; run against
this one, the scenarios also test the harness itself. ``python -m tests.conformance_cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis

from producer import Producer, Settings, wire
from producer.append import BACKPRESSURE, CONFLICT, PROTOCOL, queue_append
from producer.errors import Backpressure, SchemaConflict, UpgradeRequired


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
            schema = wire.schema_from_canonical(Path(args.schema).read_bytes())
            rows = json.loads(Path(args.rows).read_text())
            entry_id = p.append(args.table, pa.Table.from_pylist(rows, schema=schema))
            return _out(0, ok=True, entry_id=entry_id)
        except SchemaConflict as exc:
            return _out(2, ok=False, error="schema_conflict", column=exc.column,
                        message=str(exc))
        except Backpressure as exc:
            return _out(3, ok=False, error="backpressure", message=str(exc))
        except UpgradeRequired as exc:
            return _out(4, ok=False, error="upgrade_required", required=exc.required,
                        message=str(exc))
        except (ValueError, redis.RedisError) as exc:
            return _out(1, ok=False, error="other", message=str(exc))


def _append_payload(p: Producer, args: argparse.Namespace) -> int:
    """One transaction of the given bytes and claimed schema: no shaping, no retry."""
    keys = wire.Keys(args.prefix, args.table)
    p.redis.sadd(wire.tables_key(args.prefix), args.table)
    pipe = p.redis.pipeline(transaction=True)
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
    if code != 1:
        return _out(1, ok=False, error="other", message=value.decode())
    return _out(0, ok=True, entry_id=value.decode())


def _canonical(path: str) -> int:
    try:
        schema = pa.ipc.open_stream(Path(path).read_bytes()).schema
    except (pa.ArrowException, OSError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(wire.canonical_schema(schema) + b"\n")
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
