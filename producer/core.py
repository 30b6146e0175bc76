"""The producer's logic without I/O: shared by ``Producer`` and ``AsyncProducer``.

What a client sends and what Redis's replies mean live here; the clients only move bytes
(redis-py's blocking client, or its asyncio one) and wait. So both producers convert,
validate, shape, size and encode a batch the same way, queue the same append transaction
(``producer.append``), and read the check script's verdicts the same way:

* ``prepare``: the data as an Arrow table, checked on its own, with a batch ID;
* ``shape``: brought to the table's schema as this producer last saw it (conformed, or
  evolving it with a compare-and-set);
* ``queue``: the ``MULTI``/``XADD``/``EVAL``/``EXEC`` of each batch on a pipeline (queueing
  is synchronous on both clients' pipelines);
* ``verdicts``: the check's verdict on each batch, from the pipeline's replies (raising
  what Redis refused outright);
* ``accepted`` and ``refused``: what a verdict means: the entry ID, or what to do next
  (reshape and send again; wait for room; or the error to raise);
* sharded tables (protocol 2, docs/shards.md): ``route_stale``/``learn_route`` (the shard
  count and key, read again at most every ``ROUTE_TTL_S``), ``route`` (which shard each
  batch, or part of one, goes to) and ``evolve_authority`` (the compare-and-set of shard
  0's schema before a shard's copy evolves, as steps whose I/O the client runs).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa
import redis

from . import cluster, scripts, shards, wire
from .append import BACKPRESSURE, CONFLICT, NO_MEMORY, PROTOCOL, queue_append
from .convert import conform, evolve
from .errors import Backpressure as Backpressure
from .errors import (
    BatchTooLarge,
    InvalidTableName,
    SchemaRace,
    UnsupportedData,
    UpgradeRequired,
)
from .settings import Settings
from .tablecfg import TableConfig
from .typepolicy import AppendCheck, over_long, values_refusal

#: How many times one batch is reshaped and sent again because the table's schema changed
#: between its shaping and its arrival (other producers evolving it at the same moment).
SCHEMA_RACES = 3
#: How long a producer uses a table's shard count before reading its configuration again.
ROUTE_TTL_S = 5.0
#: The compare-and-set of a sharded table's schema (``producer/lua/schema_evolve.lua``).
EVOLVE = scripts.load("schema_evolve")

#: One run of ``schema_evolve.lua`` that ``AppendCore.evolve_authority`` asks the client
#: for: its keys and arguments (the client runs it on shard 0's master and sends back its
#: reply, ``[code, stored schema]``).
EvolveScript = tuple[list[str], list[Any]]


@dataclass
class Pending:
    """One batch on its way: its Arrow table, payload and the schema move it makes."""

    arrow: pa.Table
    batch_id: str
    #: the canonical form of the batch's schema (docs/spec.md), the check's ``schema``
    schema_bytes: bytes = b""
    #: the table's schema as stored, when this batch evolves it (compare-and-set), else b""
    evolves_from: bytes = b""
    dead_id: str = ""
    payload: Any = None  # the Arrow IPC stream (a buffer), once encoded
    size: int = 0  # the payload's size, known before it is encoded
    #: schema races met so far (see ``AppendCore.refused``)
    races: int = field(default=0, repr=False)


class Next(Enum):
    """What a client does after a refusal that is not an error (``AppendCore.refused``)."""

    RESEND = "resend"  # the table's schema moved: shape again (``shape``), send again now
    WAIT = "wait"  # backpressure: wait for room (with a deadline), then send again


class AppendCore:
    """The state and decisions of appending, for one producer (see the module doc)."""

    def __init__(self, settings: Settings, protocol: int = wire.PROTOCOL) -> None:
        self.settings = settings
        #: the protocol version this producer speaks (ARGV 9 of the check)
        self.protocol = protocol
        #: the tables, and shards (by hash tag), whose schema this producer has read
        self.registered: set[str] = set()
        #: table or shard (hash tag) -> (its schema, the value of ``:schema`` it was read
        #: from); a table's own entry is shard 0's schema, the authority of its shards
        self.schemas: dict[str, tuple[pa.Schema, bytes]] = {}
        #: table or shard (hash tag) -> its pending bytes after the last accepted append
        self.pending: dict[str, int] = {}
        #: types some reader rejects (``producer.typepolicy``); its rare look-up of a
        #: table's configuration is the client's (``needs_config``)
        self.types = AppendCheck(None, settings.table_format)
        #: table -> (when to read its configuration again, its shard count, shard key)
        self.routes: dict[str, tuple[float, int, str]] = {}
        #: table -> the shard its next batch goes to (round-robin)
        self.next_shard: dict[str, int] = {}

    def keys(self, table: str) -> wire.Keys:
        if not wire.valid_table_name(table):
            raise InvalidTableName(table)
        return wire.Keys(self.settings.key_prefix, table)

    def prepare(self, keys: wire.Keys, arrow: pa.Table, config: Any = None) -> Pending:
        """Check a batch (``to_table``'s result) on its own, before anything is written to
        Redis. ``config``: the table's configuration, read only if ``needs_config``."""
        self.types.decide(keys, arrow.schema, config)
        if config is not None or over_long(arrow) is not None:
            # a uint64 over 2**63-1, which a lake table cannot hold (typepolicy): refused
            # up front rather than set aside as a dead letter by the flush
            fmt = TableConfig.from_json(config).format or self.settings.table_format
            refused = values_refusal(arrow, fmt, keys.table)
            if refused is not None:
                raise refused
        item = Pending(arrow, uuid.uuid4().hex, wire.canonical_schema(arrow.schema))
        self.measure(keys.table, item)
        return item

    def needs_config(self, keys: wire.Keys, arrow: pa.Table) -> bool:
        """Whether ``prepare`` needs the table's configuration (rare: a column of a type
        only some readers reject, whose fate the table's ``spark_compatible`` decides, or a
        uint64 over 2**63-1, which the table's format decides)."""
        return self.types.needs_config(keys, arrow.schema) or over_long(arrow) is not None

    def registered_as(self, keys: wire.Keys, stored: bytes | None) -> None:
        """The table's (or shard's) registration came back with its stored schema."""
        if stored:
            self.remember(keys, stored)
        self.registered.add(keys.tag)

    def remember(self, keys: wire.Keys, stored: bytes) -> None:
        """Keep the table's (or shard's) schema, as its ``:schema`` held it (``stored``)."""
        table = keys.table
        if not stored:
            self.schemas.pop(keys.tag, None)
            return
        known = self.schemas.get(keys.tag)
        if known is None or known[1] != stored:
            try:
                schema = wire.stored_schema(stored)
            except ValueError as exc:  # never replaced (docs/spec.md 6.4): appended under it
                raise ValueError(
                    f"table {table!r}: its stored schema is not a protocol-{wire.PROTOCOL} "
                    f"canonical schema, so no batch can be shaped to it; nothing was "
                    f"appended (docs/spec.md 6.4; a later protocol, or a faulty writer, "
                    f"stored it): {exc}") from exc
            self.schemas[keys.tag] = (schema, stored)

    def shape(self, keys: wire.Keys, item: Pending,
              authority: Callable[[wire.Keys, pa.Schema], pa.Schema] | None = None
              ) -> Pending:
        """Bring the batch to the table's schema as this producer last saw it: conformed to
        it (column order, nulls for missing nullable columns, widened types), or evolving it
        (``evolves_from`` is then the stored value: the check's compare-and-set). Raises
        ``SchemaConflict`` naming the column when neither is possible.

        A shard (>= 1) of a sharded table moves its copy only to a schema the table (shard
        0) holds: ``authority(keys, schema)`` (the client's I/O) returns that schema."""
        table = keys.table
        item.evolves_from = b""
        known = self.schemas.get(keys.tag)
        if keys.shard == 0 and (known is None or known[1] == item.schema_bytes):
            return item
        if known is not None and known[1] == item.schema_bytes:
            return item
        raw = b"" if known is None else known[1]
        target = None if known is None else evolve(known[0], item.arrow.schema, table)
        if keys.shard and (target is None or wire.canonical_schema(target) != raw):
            if authority is None:
                raise TypeError("shaping a batch for a shard needs the client's authority")
            target = authority(keys, item.arrow.schema)
        assert target is not None
        target_bytes = wire.canonical_schema(target)
        if target_bytes != item.schema_bytes:
            item.arrow = conform(item.arrow, target, table)
            item.schema_bytes = target_bytes
            self.measure(table, item)
        if known is not None and target_bytes != raw:  # an evolution, or a stored value
            item.evolves_from = raw                     # to bring to canonical form
        return item

    def measure(self, table: str, item: Pending) -> None:
        """Size the batch's payload (and refuse it if too large) without encoding it yet."""
        item.size = wire.payload_size(item.arrow)
        item.payload = None
        if item.size > self.settings.max_batch_bytes:
            raise BatchTooLarge(table, item.size, self.settings.max_batch_bytes)

    @staticmethod
    def encode(items: list[Pending]) -> list[Pending]:
        for item in items:
            if item.payload is None:
                item.payload = wire.encode_table(item.arrow, item.size)
        return items

    def queue(self, pipe: Any, keys: wire.Keys, items: list[Pending]) -> None:
        """Queue the append of ``items`` (encoded) on ``pipe``, a pipeline without a
        transaction: each batch in a ``MULTI``/``EXEC`` of its own (see
        ``producer.append``), so Redis runs each as soon as it has arrived."""
        for item in items:
            pipe.execute_command("MULTI")
            queue_append(pipe, keys, item.payload, item.arrow.num_rows, item.batch_id,
                         item.schema_bytes, item.evolves_from,
                         self.settings.max_pending_bytes, item.dead_id, self.protocol)
            pipe.execute_command("EXEC")

    @staticmethod
    def verdicts(keys: wire.Keys, replies: list[Any]) -> list[list[Any]]:
        """The check script's verdict on each batch, from the replies of ``queue``'s
        commands (``raise_on_error=False``); raises what Redis refused outright."""
        out = []
        for reply in replies:
            # e.g. EXECABORT: Redis refused a command at queueing; nothing of it ran
            for error in (reply if isinstance(reply, list) else [reply]):
                if isinstance(error, redis.OutOfMemoryError):
                    raise out_of_memory(keys.table, error) from error
                if isinstance(error, Exception):
                    raise error
            if isinstance(reply, list):  # an EXEC: XADD, check
                out.append(reply[-1])
        return out

    def accepted(self, keys: wire.Keys, item: Pending, verdict: list[Any]) -> str | None:
        """The entry ID if Redis accepted ``item``, else None."""
        code, value, *rest = verdict
        if code == NO_MEMORY:  # refused inside the script (see producer.append)
            raise out_of_memory(keys.table, value.decode())
        if code in (CONFLICT, BACKPRESSURE, PROTOCOL):
            return None
        self.remember(keys, item.schema_bytes)
        self.pending[keys.tag] = int(rest[0])
        return str(value.decode())

    def refused(self, keys: wire.Keys, item: Pending, verdict: list[Any]) -> Next:
        """What to do after Redis refused ``item`` with ``verdict`` (not accepted): shape it
        again (``shape``: to the schema the refusal returned, which this remembers; raises
        ``SchemaConflict`` if it cannot fit) and send it again (at most ``SCHEMA_RACES``
        times, then ``SchemaRace``), or wait for room (backpressure; the client raises
        ``backpressure(...)`` when it will not wait). Raises what cannot be retried."""
        table = keys.table
        code, value = verdict[0], verdict[1]
        if code == BACKPRESSURE:
            return Next.WAIT
        if code == PROTOCOL:
            raise UpgradeRequired(table, int(value), self.protocol)
        # CONFLICT: the table's schema is not the one the batch was shaped for
        item.races += 1
        if bytes(value) in (item.schema_bytes, item.evolves_from):
            # the schema the batch was shaped for: shaping again would send the same
            # payload (docs/spec.md, section 8); no protocol-1 check replies so
            raise SchemaRace(table, item.races, same=True)
        if item.races > SCHEMA_RACES:
            raise SchemaRace(table, item.races)
        self.remember(keys, bytes(value))
        return Next.RESEND

    # --- shards (protocol 2, docs/shards.md) --------------------------------------------

    def route_stale(self, keys: wire.Keys) -> bool:
        """Whether the table's shard count must be read (again) before ``route``: it is
        used for ``ROUTE_TTL_S`` (a producer that still uses the old count after a change
        writes to shards the workers flush all the same: they flush every shard the table
        ever had)."""
        route = self.routes.get(keys.table)
        return route is None or route[0] < time.monotonic()

    def learn_route(self, keys: wire.Keys, config: bytes | None) -> int:
        """Keep the shard count and key of the table's configuration (``{T}:config``, as
        read); return the count."""
        parsed = TableConfig.from_json(config)
        self.routes[keys.table] = (time.monotonic() + ROUTE_TTL_S, parsed.shards,
                                   parsed.shard_key)
        return parsed.shards

    def shard_count(self, keys: wire.Keys) -> int:
        """The table's shard count as last learnt (``learn_route``)."""
        return self.routes[keys.table][1]

    def route(self, keys: wire.Keys, item: Pending, pinned: bool = False
              ) -> list[tuple[wire.Keys, Pending]] | None:
        """The shards ``item`` goes to, with its part for each; None for an unsharded
        table (its route learnt first: ``learn_route``). By its shard key's values
        (``crc32`` of their canonical bytes, mod N: ``shards.split``), else the next shard in
        turn; or, for a batch ID the caller gave (``pinned``: a retry of an append must
        reach the shard that remembers the ID), the ``crc32`` of the ID. A part of a split
        batch has the batch's ID with ``-s<shard>`` after it, so a retry dedups it too."""
        _, count, key = self.routes[keys.table]
        if count == 1:
            return None
        if not key:
            if pinned:
                return [(keys.for_shard(shards.shard_of(item.batch_id, count)), item)]
            shard = self.next_shard.get(keys.table, random.randrange(count)) % count
            self.next_shard[keys.table] = shard + 1
            return [(keys.for_shard(shard), item)]
        if item.arrow.schema.get_field_index(key) < 0:
            raise UnsupportedData(
                f"table {keys.table!r} is sharded by column {key!r} (its shard_key), which "
                f"this batch lacks; its columns are {item.arrow.schema.names}. Add the column, "
                "or change the table's shard_key (`deltaflush table set`)")
        parts = shards.split(item.arrow, key, count)
        if len(parts) == 1:
            return [(keys.for_shard(parts[0][0]), item)]
        out = []
        for shard, rows in parts:
            part = Pending(rows, f"{item.batch_id}-s{shard}", item.schema_bytes)
            self.measure(keys.table, part)
            out.append((keys.for_shard(shard), part))
        return out

    def evolve_authority(self, keys: wire.Keys, batch: pa.Schema
                         ) -> Generator[EvolveScript, list[Any], pa.Schema]:
        """The schema a batch for shard ``keys`` (>= 1) evolves the shard's copy to: the
        table's schema (shard 0's, the authority) evolved by ``batch``, moved there first
        with a compare-and-set in shard 0's slot; so every shard's copy is a schema the
        table had, and two shards never evolve a column two ways (the second producer gets
        the first one's schema back, and a ``SchemaConflict`` if its batch cannot fit).

        Steps without I/O: each ``EvolveScript`` yielded is a run of ``schema_evolve.lua``
        the client makes (``queue_evolve``, ``evolve_reply``) and sends the reply back
        into; returns at once, yielding nothing, when the authority holds the target."""
        table = keys.for_shard(0)
        for _race in range(SCHEMA_RACES + 1):
            known = self.schemas.get(table.tag)
            target = batch if known is None else evolve(known[0], batch, keys.table)
            target_bytes = wire.canonical_schema(target)
            if known is not None and known[1] == target_bytes:
                return target
            code, value = yield EVOLVE.argv(
                {"schema": table.authority, "protocol": table.protocol},
                {"expected": b"" if known is None else known[1], "schema": target_bytes,
                 "protocol": self.protocol})
            if code == PROTOCOL:
                raise UpgradeRequired(keys.table, int(value), self.protocol)
            self.remember(table, bytes(value))
            if code == 1:
                return target
        raise SchemaRace(keys.table, SCHEMA_RACES + 1)

    def queue_evolve(self, pipe: Any, script: EvolveScript) -> None:
        """Queue a run of ``schema_evolve.lua`` on ``pipe`` (a pipeline on shard 0's
        master), then, with ``append_replicas``, a ``WAIT`` for the replicas: an authority
        lost in a failover could let another shard evolve a column a second way. ``EVAL``,
        as the check: protocol 2 needs no permission beyond protocol 1's."""
        key_list, arg_list = script
        pipe.eval(EVOLVE.source, len(key_list), *key_list, *arg_list)
        if self.settings.append_replicas:
            cluster.queue_wait(pipe, self.settings.append_replicas,
                               self.settings.append_replicas_timeout_ms)

    def evolve_reply(self, keys: wire.Keys, replies: list[Any]) -> list[Any]:
        """The script's reply from ``queue_evolve``'s replies (``ReplicationTimeout`` if
        the replicas asked for did not acknowledge it in time)."""
        if self.settings.append_replicas:
            cluster.check_acked(replies[-1], self.settings.append_replicas,
                                self.settings.append_replicas_timeout_ms,
                                f"table {keys.table!r}: its schema evolved")
        return list(replies[0])

    def backpressure(self, keys: wire.Keys, verdict: list[Any]) -> Backpressure:
        return Backpressure(keys.table, int(verdict[1]), self.settings.max_pending_bytes)

    def trigger_due(self, keys: wire.Keys) -> bool:
        """Whether the last accepted append put the table (or shard) past
        ``flush_at_bytes`` (the size trigger: queue a flush now); forgets it."""
        return self.pending.pop(keys.tag, 0) >= self.settings.flush_at_bytes


def partly_appended(exc: Exception, ids: list[str | None]) -> None:
    """Mark ``exc``, raised by ``append_many`` midway, with the entry IDs of the batches
    already appended (``.appended``; None for the others)."""
    exc.appended = ids  # type: ignore[attr-defined]
    exc.add_note(
        f"append_many: {sum(i is not None for i in ids)} of the {len(ids)} batches of this "
        "call are appended; `.appended` has their entry IDs (None for the others), so "
        "retry only the others.")


def out_of_memory(table: str, reason: object) -> redis.OutOfMemoryError:
    return redis.OutOfMemoryError(
        f"Redis is out of memory (over its maxmemory) and refused a batch for table "
        f"{table!r}; nothing of that batch was appended. Let the workers flush, or give "
        f"Redis more memory, then retry ({reason})")
