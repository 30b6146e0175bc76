"""The producer: what application code imports to append batches and ask for flushes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from . import admin, cluster, shards, wire
from .append import BACKPRESSURE
from .batcher import Batcher
from .convert import to_table
from .core import ROUTE_TTL_S as ROUTE_TTL_S
from .core import SCHEMA_RACES as SCHEMA_RACES
from .core import AppendCore, EvolveScript, Next, Pending, partly_appended
from .due import DUE, celery_app, due_args, due_keys, queue_flush, send_or_unmark
from .errors import (
    Backpressure,
    DeltaflushError,
    ReplicationTimeout,
    SchemaRace,
)
from .settings import Settings
from .tablecfg import TableConfig

log = logging.getLogger(__name__)

#: ``append_many`` sends its batches in groups of about this many payload bytes.
SEND_GROUP_BYTES = 8 * 1024 * 1024

if TYPE_CHECKING:  # importing pyarrow.dataset imports pandas, when installed (+40 MiB)
    import pyarrow.dataset as ds


def connect(url: str, retries: int = 0) -> redis.Redis:
    """A Redis client for the delta tier that reconnects by itself: a
    ``redis.cluster.RedisCluster`` when ``url`` names a node of a Redis Cluster (it offers
    the same commands, routed by key; ``producer.cluster``), else a ``redis.Redis``.

    ``retries`` > 0 retries a command on a lost connection with exponential backoff (up to
    about ``retries`` seconds in all); use it only for idempotent commands. The producer's
    appends are (a batch ID deduplicates them); the workers rely on Celery's retries.
    """
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries) if retries else \
        Retry(NoBackoff(), 0)
    common: dict[str, Any] = dict(health_check_interval=30, socket_keepalive=True,
                                  socket_connect_timeout=5)
    if cluster.names_a_cluster(url, retry):
        return cast(redis.Redis, RedisCluster.from_url(
            url, retry=retry, connection_class=_PayloadConnection, **common))
    # redis-py's own serializer sends a large payload as it is (one ``sendall`` of the
    # buffer); the hiredis one, its default once hiredis is installed, first copies every
    # command into one string, which halves append throughput. hiredis still parses replies.
    packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    return redis.Redis.from_url(
        url,
        command_packer=packer,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError] if retries else [],
        **common,
    )


class _PayloadConnection(redis.connection.Connection):
    """A connection that sends large payloads as they are (``PythonRespSerializer``, as
    ``connect`` gives a single Redis): for a cluster client, whose options take no packer."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


#: One batch on its way (``producer.core``).
_Pending = Pending


class Producer:
    """Append Arrow batches to tables and ask for flushes.

    ``Producer()`` reads its settings from the environment; ``redis_url``, ``broker_url``,
    ``key_prefix`` and ``append_replicas`` (or a whole ``settings``) override them.
    Thread-safe: the Redis client has a connection pool.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        broker_url: str | None = None,
        *,
        key_prefix: str | None = None,
        append_replicas: int | None = None,
        settings: Settings | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(
            redis_url=redis_url, broker_url=broker_url, key_prefix=key_prefix,
            append_replicas=append_replicas)
        self.redis = client if client is not None else connect(self.settings.redis_url, retries=8)
        if cluster.is_cluster(self.redis):
            cluster.require_broker(self.settings.redis_url, self.settings.broker_url)
        #: what to send and what the replies mean (shared with ``AsyncProducer``); its
        #: state: the tables and shards registered, their schemas and pending bytes
        self._core = AppendCore(self.settings)
        self._registered = self._core.registered
        self._schemas = self._core.schemas
        self._pending = self._core.pending
        #: table -> (when to read its configuration again, its shard count, shard key),
        #: and the next shard of each round-robin table (``AppendCore.route``)
        self._routes = self._core.routes
        self._next_shard = self._core.next_shard
        self._celery: Any = None

    # --- appending --------------------------------------------------------------------

    def append(self, table: str, data: Any, *, timeout_s: float | None = None,
               batch_id: str | None = None) -> str:
        """Append one batch; return its stream entry ID once Redis has accepted it.

        ``data`` is a ``pyarrow.Table``, ``pyarrow.RecordBatch``, ``pandas.DataFrame`` or a
        list of dicts. Raises an ``InvalidInput`` (a ``ValueError``) and writes nothing if
        the table name or the data is invalid or its schema conflicts with the table's.
        Compatible schema changes (new columns, widened types) evolve the table's schema.

        Raises ``Backpressure`` while the table has more than ``max_pending_bytes`` waiting,
        or, with ``timeout_s``, waits up to that long for room. A lost connection is retried
        (the batch carries an ID, so a retry never adds it twice).

        With ``append_replicas`` > 0 it returns once that many replicas hold the batch, or
        raises ``ReplicationTimeout``; ``batch_id`` (a retry passes the error's
        ``batch_ids[0]``) makes a retry within two minutes add nothing twice.
        """
        keys = self._keys(table)
        item = self._prepare(table, data)
        if batch_id is not None:
            item.batch_id = batch_id
        self._register(keys)
        parts = self._route(keys, item, pinned=batch_id is not None)
        if parts is None:
            entry_id = self._send(keys, self._shape(keys, item), timeout_s)
            self._maybe_trigger(keys)
            return entry_id
        ids = []
        for shard, part in parts:
            self._register(shard)
            try:
                sent = self._send(shard, self._shape(shard, part), timeout_s)
            except ReplicationTimeout as exc:  # retried whole: the parts' IDs follow from it
                exc.batch_ids = (item.batch_id,)
                raise
            ids.append(f"{shard.shard}:{sent}")
            self._maybe_trigger(shard)
        return " ".join(ids)

    def append_many(self, table: str, batches: Iterable[Any], *,
                    timeout_s: float | None = None) -> list[str]:
        """Append several batches, pipelined; return their entry IDs.

        Each batch is one transaction; they are sent in groups of about 8 MiB, the next
        group encoded while the last one is on its way. Every batch is converted and
        checked first, so a bad batch raises before anything is sent. A batch that Redis
        refuses (the table's schema changed meanwhile, or backpressure) is retried alone,
        after the others.
        """
        keys = self._keys(table)
        items = [self._prepare(table, data) for data in batches]
        self._register(keys)
        if self._shard_count(keys) > 1:
            return self._append_many_sharded(keys, items, timeout_s)
        for item in items:
            self._shape(keys, item)
        verdicts = self._send_groups(keys, items)
        ids: list[str | None] = [self._accepted(keys, item, verdict)
                                 for item, verdict in zip(items, verdicts, strict=False)]
        ids += [None] * (len(items) - len(ids))
        for n, item in enumerate(items):
            if ids[n] is None:
                try:
                    ids[n] = self._send(keys, item, timeout_s,
                                        verdicts[n] if n < len(verdicts) else None)
                except DeltaflushError as exc:
                    partly_appended(exc, ids)
                    raise
        self._maybe_trigger(keys)
        return [str(i) for i in ids]

    def _append_many_sharded(self, keys: wire.Keys, items: list[_Pending],
                             timeout_s: float | None) -> list[str]:
        """``append_many`` to a sharded table: each batch (or part of one, with a shard
        key) goes to its shard, batch by batch; IDs as ``append`` returns them."""
        ids: list[str | None] = [None] * len(items)
        for n, item in enumerate(items):
            parts = self._route(keys, item) or [(keys, item)]
            try:
                found = []
                for shard, part in parts:
                    self._register(shard)
                    found.append(f"{shard.shard}:"
                                 f"{self._send(shard, self._shape(shard, part), timeout_s)}")
                    self._maybe_trigger(shard)
            except DeltaflushError as exc:
                exc.appended = ids  # type: ignore[attr-defined]
                exc.add_note(
                    f"append_many: {n} of the {len(ids)} batches of this call are appended; "
                    "`.appended` has their entry IDs (None for the others).")
                raise
            ids[n] = " ".join(found)
        return [str(i) for i in ids]

    # --- shards (protocol 2, docs/shards.md) ----------------------------------------

    def _shard_count(self, keys: wire.Keys) -> int:
        """The table's shard count, from its configuration read at most ``ROUTE_TTL_S``
        ago (``AppendCore.route_stale``)."""
        if self._core.route_stale(keys):
            return self._core.learn_route(keys, cast(bytes | None, self.redis.get(keys.config)))
        return self._core.shard_count(keys)

    def _route(self, keys: wire.Keys, item: _Pending, pinned: bool = False
               ) -> list[tuple[wire.Keys, _Pending]] | None:
        """The shards ``item`` goes to, with its part for each; None for an unsharded
        table (``AppendCore.route``)."""
        self._shard_count(keys)
        return self._core.route(keys, item, pinned)

    def _evolve_authority(self, keys: wire.Keys, batch: pa.Schema) -> pa.Schema:
        """The schema shard ``keys`` (>= 1) evolves its copy to, once shard 0's (the
        authority) holds it: ``AppendCore.evolve_authority``'s steps, each run of
        ``schema_evolve.lua`` on shard 0's master (again while its slot moves or fails
        over: a compare-and-set, so a repeat is harmless)."""
        steps = self._core.evolve_authority(keys, batch)
        try:
            script = next(steps)
            while True:
                script = steps.send(self._evolve_script(keys, script))
        except StopIteration as done:
            return cast(pa.Schema, done.value)

    def _evolve_script(self, keys: wire.Keys, script: EvolveScript) -> list[Any]:
        def run(master: redis.Redis) -> list[Any]:
            pipe = master.pipeline(transaction=False)
            self._core.queue_evolve(pipe, script)
            return cast(list[Any], pipe.execute())

        return self._core.evolve_reply(
            keys, cluster.on_master(self.redis, keys.for_shard(0).authority, run))

    def _send_groups(self, keys: wire.Keys, items: list[_Pending]) -> list[list[Any]]:
        """Send ``items`` in groups of about ``SEND_GROUP_BYTES``, encoding the next group
        while the last one is on its way and Redis appends it; return Redis's verdicts, in
        order. Once Redis refuses a batch for backpressure, stop: the verdicts end there
        and the rest wait in ``_send``."""
        groups: list[list[_Pending]] = []
        size = SEND_GROUP_BYTES
        for item in items:
            if size >= SEND_GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.size
        if len(groups) <= 1:
            return self._transaction(keys, self._encode(groups[0])) if groups else []
        verdicts: list[list[Any]] = []
        with ThreadPoolExecutor(1, thread_name_prefix="deltaflush-send") as sender:
            sending = None
            for group in groups:
                self._encode(group)
                if sending is not None:
                    verdicts += sending.result()
                    if any(v[0] == BACKPRESSURE for v in verdicts):
                        return verdicts
                sending = sender.submit(self._transaction, keys, group)
            assert sending is not None
            return verdicts + sending.result()

    def batcher(self, **options: Any) -> Batcher:
        """A batching producer over this one, for event-at-a-time writes: ``write(table,
        row)`` returns a future; rows are merged per table and appended after
        ``linger_ms`` (5), ``max_rows`` or ``max_bytes``. Options and guarantees:
        ``producer.batcher`` (docs/batching.md)."""
        return Batcher(self, **options)

    def replay_dead(self, table: str,
                    progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Re-append the dead letters of ``table`` that now decode and fit its schema.

        Each one is appended and removed from ``{table}:dead`` in one atomic step. Returns
        ``(replayed, still_dead)``; ``progress(done, total)`` is called after each entry.
        """
        self._register(self._keys(table))
        replayed = still_dead = 0
        # each shard's dead letters go back to that shard (the check removes the dead
        # letter in the shard's slot)
        entries = [(keys, entry) for keys in shards.table_shards(
            self.redis, self.settings.key_prefix, table)
            for entry in cast(list[wire.Entry], self.redis.xrange(keys.dead))]
        for done, (keys, (entry_id, fields)) in enumerate(entries, 1):
            try:
                self._register(keys)
                arrow = to_table(wire.decode_payload(fields.get(wire.FIELD_ARROW, b"")))
                item = self._shape(keys, self._prepare(table, arrow))
                item.dead_id = entry_id.decode()
                self._send(keys, item, None)
            except (ValueError, Backpressure, SchemaRace) as exc:
                log.info("dead letter %s of %s stays: %s", entry_id, table, exc)
                still_dead += 1
            else:
                replayed += 1
            if progress is not None:
                progress(done, len(entries))
        return replayed, still_dead

    def _keys(self, table: str) -> wire.Keys:
        return self._core.keys(table)

    def _prepare(self, table: str, data: Any) -> _Pending:
        """Convert and check a batch on its own (before anything is written to Redis)."""
        keys = self._keys(table)
        arrow = to_table(data)
        config = self.redis.get(keys.config) if self._core.needs_config(keys, arrow) else None
        return self._core.prepare(keys, arrow, config)

    def _register(self, keys: wire.Keys) -> None:
        """Before the first append of a table from this process: add it to
        ``{prefix}:tables`` and learn its schema, so that the first batch is sent in the
        table's shape. The ``SADD`` is a command of its own, answered before any append
        starts: never inside an append's transaction, whose keys all share the table's hash
        slot (Redis Cluster). A crash in between leaves a registered, empty table."""
        if keys.tag in self._registered:
            return
        stored: bytes | None
        if keys.shard:  # a shard of a registered table: only its schema copy to learn
            stored = cast(bytes | None, self.redis.get(keys.schema))
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(wire.tables_key(self.settings.key_prefix), keys.table)
            pipe.get(keys.schema)
            _, stored = pipe.execute()
        self._core.registered_as(keys, stored)

    def _remember(self, keys: wire.Keys, stored: bytes) -> None:
        self._core.remember(keys, stored)

    def _shape(self, keys: wire.Keys, item: _Pending) -> _Pending:
        return self._core.shape(keys, item, self._evolve_authority)

    def _measure(self, table: str, item: _Pending) -> None:
        self._core.measure(table, item)

    @staticmethod
    def _encode(items: list[_Pending]) -> list[_Pending]:
        return AppendCore.encode(items)

    def _transaction(self, keys: wire.Keys, items: list[_Pending]) -> list[list[Any]]:
        """Append ``items`` in one round trip, each in a ``MULTI``/``EXEC`` of its own (see
        ``producer.append``); return the check script's verdict on each.

        One transaction per batch, not one for all: Redis runs each as soon as it has
        arrived, while the next ones are still being sent.
        """
        replicas = self.settings.append_replicas
        timeout_ms = self.settings.append_replicas_timeout_ms

        def send(master: redis.Redis) -> tuple[list[list[Any]], int]:
            pipe = master.pipeline(transaction=False)
            self._core.queue(pipe, keys, items)
            if replicas:  # on the same connection, right after the transactions
                cluster.queue_wait(pipe, replicas, timeout_ms)
            replies = pipe.execute(raise_on_error=False)
            verdicts = self._core.verdicts(keys, replies)  # raises what Redis refused
            return verdicts, replies[-1] if replicas else 0

        # On a cluster: on the master of the table's slot, again while the slot moves or
        # fails over (each batch's ID makes that harmless).
        verdicts, acked = cluster.on_master(self.redis, keys.delta, send)
        if replicas:
            cluster.check_acked(acked, replicas, timeout_ms,
                                f"table {keys.table!r}: {len(items)} batch(es) appended",
                                tuple(item.batch_id for item in items))
        return verdicts

    def _accepted(self, keys: wire.Keys, item: _Pending, verdict: list[Any]) -> str | None:
        """The entry ID if Redis accepted ``item``, else None."""
        return self._core.accepted(keys, item, verdict)

    def _send(self, keys: wire.Keys, item: _Pending, timeout_s: float | None,
              verdict: list[Any] | None = None) -> str:
        """Append ``item`` alone until Redis accepts it; ``verdict`` is Redis's answer to an
        earlier try, if there was one.

        The payload is sent again only once the cause of a refusal is gone: the table's
        schema changed (the batch is first reshaped to the schema the refusal returned; at
        most ``SCHEMA_RACES`` times, then ``SchemaRace``), or, with ``timeout_s``, the table
        has room again (polled without sending the payload)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        item.races = 0
        while True:
            if verdict is None:
                verdict = self._transaction(keys, self._encode([item]))[0]
            entry_id = self._accepted(keys, item, verdict)
            if entry_id is not None:
                return entry_id
            if self._core.refused(keys, item, verdict) is Next.RESEND:
                self._shape(keys, item)  # raises SchemaConflict if it cannot fit
            elif deadline is None or not self._wait_for_room(keys, deadline):
                raise self._core.backpressure(keys, verdict)
            verdict = None

    def _wait_for_room(self, keys: wire.Keys, deadline: float) -> bool:
        """Wait, polling the pending counter (not resending the payload), until the table is
        under its pending limit again; False if ``deadline`` passes first."""
        delay = 0.05
        while time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            pipe = self.redis.pipeline()
            pipe.hget(keys.pending, "bytes")
            pipe.xlen(keys.delta)
            pending, length = pipe.execute()
            if int(pending or 0) < self.settings.max_pending_bytes or not length:
                return True
        return False

    # --- reading -----------------------------------------------------------------------

    def read(self, table: str, columns: Sequence[str] | None = None,
             filter: pc.Expression | None = None, *, min_id: str | None = None,
             timeout_s: float = 10.0) -> pa.RecordBatchReader:
        """Every row of ``table``, flushed or not, as one consistent snapshot: the lake's
        rows up to its watermark and the delta's entries after it, each row exactly once,
        even while flushes and compactions commit (``producer.read``). A batch whose
        ``append`` returned before this call is in it.

        ``columns`` selects columns; ``filter`` (a ``pyarrow.compute.Expression``, e.g.
        ``pc.field("country") == "de"``) keeps matching rows; both are pushed down to the
        lake reader and applied to the delta's decoded batches. ``min_id`` (an entry ID
        ``append`` returned) waits, up to ``timeout_s``, until the snapshot holds it, then
        raises ``NotYetVisible``. The rows are streamed: the lake's, then the delta's, in
        the table's current schema (columns added since a row was written read null).
        Raises ``UnknownTable`` for a table never appended to."""
        from . import read

        return read.read(self.redis, self.settings, table, columns, filter, min_id, timeout_s)

    def dataset(self, table: str, *, min_id: str | None = None,
                timeout_s: float = 10.0) -> ds.Dataset:
        """The same snapshot as ``read``, as a ``pyarrow.dataset.Dataset`` that can be
        scanned any number of times (a DuckDB query that joins a table with itself, or a
        polars ``scan_pyarrow_dataset``): the lake's files, scanned lazily with pushdown,
        and the delta's rows, decoded into memory."""
        from . import read

        return read.dataset(self.redis, self.settings, table, min_id, timeout_s)

    # --- table configuration ---------------------------------------------------------

    def table_config(self, table: str) -> TableConfig:
        """The table's configuration (defaults where nothing was set)."""
        return admin.table_config(self.redis, self._keys(table))

    def configure(self, table: str, **changes: Any) -> TableConfig:
        """Change the table's configuration; return the new one. Workers apply it from their
        next flush. Raises ``ConfigError`` (a ``ValueError``) for unknown or invalid settings,
        or columns the table does not have, and ``LayoutLocked`` (one) for a change of its
        partitioning, format or ``spark_compatible`` once it has data (see
        ``producer.admin``)."""
        return admin.configure(self.redis, self.settings.key_prefix, table, changes,
                               self.settings.table_format)

    # --- flushing ---------------------------------------------------------------------

    def _maybe_trigger(self, keys: wire.Keys) -> None:
        """Size trigger: once a table's pending bytes pass ``flush_at_bytes``, queue a flush
        now instead of waiting for beat (unless one is queued or running already)."""
        if not self._core.trigger_due(keys):
            return
        if DUE(self.redis, due_keys(keys), due_args(self.settings.lease_ms, 0, force=True)):
            send_or_unmark(self.redis, keys, self._send_flush)

    def flush(self, table: str) -> bool:
        """Enqueue ``flush_table(table)`` now, unless one is already queued.

        Returns True if a task was sent. A flush that is already *running* does not stop a
        new one from being queued: it runs after, and takes whatever arrived meanwhile.
        """
        # The mark expires after a lease period, so a lost message never blocks the table.
        # A sharded table: one task per shard, each takes one shard's mark (workers.tasks).
        self._keys(table)
        sent = [queue_flush(self.redis, keys, self.settings.lease_ms, self._send_flush)
                for keys in shards.table_shards(self.redis, self.settings.key_prefix, table)]
        return any(sent)

    def request_flush(self, table: str) -> None:
        """Ask for a flush of ``table`` through Redis alone, as a producer in any language
        does (docs/spec.md, "Requesting a flush"): the next scheduling round (beat's, every
        second) queues one, unless one is queued already. Needs no Celery broker."""
        self._keys(table)
        for keys in shards.table_shards(self.redis, self.settings.key_prefix, table):
            self.redis.hset(keys.sched, wire.FIELD_FLUSH_REQUESTED, int(time.time() * 1000))

    def _send_flush(self, table: str) -> None:
        self._celery_app().send_task(wire.FLUSH_TASK, args=[table], queue=wire.QUEUE)

    def _celery_app(self) -> Any:
        if self._celery is None:
            self._celery = celery_app(self.settings.broker_url)
        return self._celery

    def close(self) -> None:
        self.redis.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
