"""The asyncio producer: ``Producer``'s API on redis-py's asyncio client, for async services
(FastAPI, aiohttp).

>>> ap = AsyncProducer()
>>> entry_id = await ap.append("events", [{"id": 1}])
>>> async with ap.batcher(linger_ms=5) as b:
...     entry_id = await b.write("events", {"id": 2})

Everything but the I/O is ``producer.core``'s, shared with ``Producer``: conversion,
validation, shaping to the table's schema, the append transaction and the reading of the
check script's verdicts; and ``producer.batcher``'s grouping and merging of writes. So the
guarantees are the same: a batch ID per append (a lost connection is retried, about 10 s in
all, and never adds a batch twice), ``Backpressure`` (or a wait of up to ``timeout_s``),
bad input refused before anything is written.

The batcher's ``write`` is a plain (not ``async``) call that buffers the write at once and
returns an ``asyncio.Future`` of its entry ID, so fire-and-forget costs no task; a write
that would pass ``max_buffer_bytes`` raises ``BufferFull`` at once (an event loop cannot
block: ``await b.flush()`` waits for room).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import pyarrow as pa
import pyarrow.compute as pc
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as SyncRetry

from . import cluster, shards, wire
from .batcher import (
    LINGER_MS,
    MAX_BUFFER_BYTES,
    MAX_BYTES,
    MAX_ROWS,
    Buffer,
    _Batch,
    classify,
    halves,
    names_of,
)
from .client import Producer
from .convert import to_table
from .core import SCHEMA_RACES, AppendCore, EvolveScript, Next, Pending, partly_appended
from .due import DUE, celery_app, due_args, due_keys
from .errors import (
    BufferFull,
    DeltaflushError,
    InvalidInput,
    ReplicationTimeout,
    SchemaRace,
)
from .settings import Settings
from .tablecfg import TableConfig

T = TypeVar("T")


def connect(url: str, retries: int = 8) -> redis.asyncio.Redis:
    """An asyncio Redis client for the delta tier that reconnects by itself (``retries`` >
    0: a command on a lost connection is retried with exponential backoff, about
    ``retries`` seconds in all; the appends are idempotent, a batch ID deduplicates them).
    A ``redis.asyncio.cluster.RedisCluster`` when ``url`` names a Redis Cluster node (asked
    once, here, as ``producer.client.connect`` does)."""
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries)
    common: dict[str, Any] = dict(health_check_interval=30, socket_keepalive=True,
                                  socket_connect_timeout=5)
    if cluster.names_a_cluster(url, SyncRetry(ExponentialBackoff(cap=2.0, base=0.1), retries)):
        return cast(redis.asyncio.Redis, AsyncRedisCluster.from_url(url, retry=retry, **common))
    return redis.asyncio.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError] if retries else [],
        **common,
    )


class _AuthorityMoves(Exception):
    """Shaping a batch for a shard needs shard 0's schema to move first (an awaited
    compare-and-set): raised through ``AppendCore.shape`` to ``AsyncProducer._shape``."""

    def __init__(self, batch: pa.Schema) -> None:
        super().__init__("the authority must move first")
        self.batch = batch


class AsyncProducer:
    """``Producer`` for asyncio (see the module doc). ``AsyncProducer()`` reads its settings
    from the environment; ``redis_url``, ``broker_url`` and ``key_prefix`` (or a whole
    ``settings``, or an asyncio ``client``) override them. Safe to share between tasks."""

    def __init__(
        self,
        redis_url: str | None = None,
        broker_url: str | None = None,
        *,
        key_prefix: str | None = None,
        settings: Settings | None = None,
        client: redis.asyncio.Redis | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(
            redis_url=redis_url, broker_url=broker_url, key_prefix=key_prefix)
        self.redis = client if client is not None else connect(self.settings.redis_url)
        if isinstance(self.redis, AsyncRedisCluster):
            cluster.require_broker(self.settings.redis_url, self.settings.broker_url)
        # Protocol 2: batches of a sharded table go to its shards (docs/shards.md), routed
        # by the core as ``Producer`` routes them.
        self._core = AppendCore(self.settings)
        self._celery: Any = None
        self._sync: Producer | None = None  # ``_blocking``
        #: plain clients of a Redis Cluster's masters, by address (``_on_master``)
        self._masters: dict[str, redis.asyncio.Redis] = {}

    # --- appending --------------------------------------------------------------------

    async def append(self, table: str, data: Any, *, timeout_s: float | None = None,
                     batch_id: str | None = None) -> str:
        """``Producer.append``: append one batch, return its entry ID once Redis has
        accepted it (and ``append_replicas`` replicas hold it: ``ReplicationTimeout``
        otherwise, retried with ``batch_id``). A sharded table's batch goes to its shard
        (or is split by its shard key): IDs as ``<shard>:<id>``, space-separated."""
        keys = self._core.keys(table)
        item = await self._prepare(keys, data)
        if batch_id is not None:
            item.batch_id = batch_id
        await self._register(keys)
        parts = await self._route(keys, item, pinned=batch_id is not None)
        if parts is None:
            entry_id = await self._send(keys, await self._shape(keys, item), timeout_s)
            await self._maybe_trigger(keys)
            return entry_id
        try:
            return await self._append_parts(parts, timeout_s)
        except ReplicationTimeout as exc:  # retried whole: the parts' IDs follow from it
            exc.batch_ids = (item.batch_id,)
            raise

    async def append_many(self, table: str, batches: Iterable[Any], *,
                          timeout_s: float | None = None) -> list[str]:
        """``Producer.append_many``: several batches in one pipelined round trip, each its
        own transaction; every batch is checked before anything is sent, a refused one is
        retried alone after the others (``.appended`` on the error if one fails). A
        sharded table's batches go to their shards batch by batch."""
        keys = self._core.keys(table)
        items = [await self._prepare(keys, data) for data in batches]
        await self._register(keys)
        if await self._shard_count(keys) > 1:
            return await self._append_many_sharded(keys, items, timeout_s)
        for item in items:
            await self._shape(keys, item)
        verdicts = await self._transaction(keys, items) if items else []
        ids: list[str | None] = [self._core.accepted(keys, item, verdict)
                                 for item, verdict in zip(items, verdicts, strict=True)]
        for n, item in enumerate(items):
            if ids[n] is None:
                try:
                    ids[n] = await self._send(keys, item, timeout_s, verdicts[n])
                except DeltaflushError as exc:
                    partly_appended(exc, ids)
                    raise
        await self._maybe_trigger(keys)
        return [str(i) for i in ids]

    async def _append_many_sharded(self, keys: wire.Keys, items: list[Pending],
                                   timeout_s: float | None) -> list[str]:
        """``Producer._append_many_sharded``: batch by batch, each to its shard(s)."""
        ids: list[str | None] = [None] * len(items)
        for n, item in enumerate(items):
            try:
                ids[n] = await self._append_parts(
                    await self._route(keys, item) or [(keys, item)], timeout_s)
            except DeltaflushError as exc:
                partly_appended(exc, ids)
                raise
        return [str(i) for i in ids]

    async def _append_parts(self, parts: list[tuple[wire.Keys, Pending]],
                            timeout_s: float | None) -> str:
        """Each part of a batch to its shard, in turn: ``<shard>:<id>`` of each."""
        found = []
        for shard, part in parts:
            await self._register(shard)
            sent = await self._send(shard, await self._shape(shard, part), timeout_s)
            found.append(f"{shard.shard}:{sent}")
            await self._maybe_trigger(shard)
        return " ".join(found)

    # --- shards (protocol 2, docs/shards.md: the decisions are ``AppendCore``'s) --------

    async def _shard_count(self, keys: wire.Keys) -> int:
        """The table's shard count, its configuration read at most ``ROUTE_TTL_S`` ago."""
        if self._core.route_stale(keys):
            return self._core.learn_route(keys, cast(bytes | None,
                                                       await self.redis.get(keys.config)))
        return self._core.shard_count(keys)

    async def _route(self, keys: wire.Keys, item: Pending, pinned: bool = False
                     ) -> list[tuple[wire.Keys, Pending]] | None:
        await self._shard_count(keys)
        return self._core.route(keys, item, pinned)

    async def _shape(self, keys: wire.Keys, item: Pending) -> Pending:
        """``AppendCore.shape``, with shard 0's authority: the core asks for it
        synchronously (``_authority_known``), so when it must move first this runs the
        compare-and-set (``_evolve_authority``), then shapes again (the authority now holds
        the target)."""
        for _ in range(SCHEMA_RACES + 1):
            try:
                return self._core.shape(keys, item, self._authority_known)
            except _AuthorityMoves as moves:
                await self._evolve_authority(keys, moves.batch)
        raise SchemaRace(keys.table, SCHEMA_RACES + 1)

    def _authority_known(self, keys: wire.Keys, batch: pa.Schema) -> pa.Schema:
        """The target if the authority, as this producer knows it, holds it already;
        ``_AuthorityMoves`` if the compare-and-set must run first."""
        try:
            next(self._core.evolve_authority(keys, batch))
        except StopIteration as done:
            return cast(pa.Schema, done.value)
        raise _AuthorityMoves(batch)

    async def _evolve_authority(self, keys: wire.Keys, batch: pa.Schema) -> pa.Schema:
        """``Producer._evolve_authority``: the core's steps, each script awaited."""
        steps = self._core.evolve_authority(keys, batch)
        try:
            script = next(steps)
            while True:
                script = steps.send(await self._evolve_script(keys, script))
        except StopIteration as done:
            return cast(pa.Schema, done.value)

    async def _evolve_script(self, keys: wire.Keys, script: EvolveScript) -> list[Any]:
        async def run(master: redis.asyncio.Redis) -> list[Any]:
            pipe = master.pipeline(transaction=False)
            self._core.queue_evolve(pipe, script)
            return cast(list[Any], await pipe.execute())

        return self._core.evolve_reply(
            keys, await self._on_master(keys.for_shard(0).authority, run))

    def batcher(self, *, linger_ms: float = LINGER_MS, max_rows: int = MAX_ROWS,
                max_bytes: int = MAX_BYTES, max_buffer_bytes: int = MAX_BUFFER_BYTES,
                append_timeout_s: float | None = None) -> AsyncBatcher:
        """``Producer.batcher`` for asyncio: ``write`` returns an awaitable (an
        ``asyncio.Future``) of the entry ID (docs/batching.md)."""
        return AsyncBatcher(self, linger_ms=linger_ms, max_rows=max_rows, max_bytes=max_bytes,
                            max_buffer_bytes=max_buffer_bytes,
                            append_timeout_s=append_timeout_s)

    async def _prepare(self, keys: wire.Keys, data: Any) -> Pending:
        arrow = to_table(data)
        config = await self.redis.get(keys.config) \
            if self._core.needs_config(keys, arrow) else None
        return self._core.prepare(keys, arrow, config)

    async def _register(self, keys: wire.Keys) -> None:
        """``Producer._register``: the table in ``{prefix}:tables``, its schema (or a
        shard's copy of it) learnt."""
        if keys.tag in self._core.registered:
            return
        if keys.shard:  # a shard of a registered table: only its schema copy to learn
            stored = cast(bytes | None, await self.redis.get(keys.schema))
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(wire.tables_key(self.settings.key_prefix), keys.table)
            pipe.get(keys.schema)
            _, stored = await pipe.execute()
        self._core.registered_as(keys, stored)

    async def _transaction(self, keys: wire.Keys, items: list[Pending]) -> list[list[Any]]:
        """``Producer._transaction``: on the master of the table's slot, then ``WAIT`` for
        ``append_replicas`` replicas on the same connection."""
        replicas = self.settings.append_replicas
        timeout_ms = self.settings.append_replicas_timeout_ms
        AppendCore.encode(items)

        async def send(master: redis.asyncio.Redis) -> tuple[list[list[Any]], int]:
            pipe = master.pipeline(transaction=False)
            self._core.queue(pipe, keys, items)
            if replicas:
                cluster.queue_wait(pipe, replicas, timeout_ms)
            replies = await pipe.execute(raise_on_error=False)
            return self._core.verdicts(keys, replies), replies[-1] if replicas else 0

        verdicts, acked = await self._on_master(keys.delta, send)
        if replicas:
            cluster.check_acked(acked, replicas, timeout_ms,
                                f"table {keys.table!r}: {len(items)} batch(es) appended",
                                tuple(item.batch_id for item in items))
        return verdicts

    async def _on_master(self, key: str, run: Callable[[redis.asyncio.Redis], Awaitable[T]]
                         ) -> T:
        """``producer.cluster.on_master`` for asyncio: ``run`` on a plain client of the
        master of ``key``'s slot, again while the slot moves or fails over (up to
        ``cluster.RETRY_S``); ``run(self.redis)`` once on a single Redis."""
        if not isinstance(self.redis, AsyncRedisCluster):
            return await run(self.redis)
        deadline = time.monotonic() + cluster.RETRY_S
        delay = 0.05
        while True:
            try:
                return await run(self._master(self.redis.get_node_from_key(key)))
            except (*cluster.REDIRECTS, redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                await self.redis.nodes_manager.initialize()
            except redis.RedisError:
                pass  # still electing: the next try reads the slots again

    def _master(self, node: Any) -> redis.asyncio.Redis:
        if node.name not in self._masters:
            options: dict[str, Any] = {**parse_url(self.settings.redis_url),
                                       "host": node.host, "port": node.port,
                                       "socket_connect_timeout": 5, "socket_keepalive": True}
            self._masters[node.name] = redis.asyncio.Redis(
                connection_pool=redis.asyncio.ConnectionPool(**options))
        return self._masters[node.name]

    async def _send(self, keys: wire.Keys, item: Pending, timeout_s: float | None,
                    verdict: list[Any] | None = None) -> str:
        """``Producer._send``: until Redis accepts ``item``, or the core says why not."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        item.races = 0
        while True:
            if verdict is None:
                verdict = (await self._transaction(keys, [item]))[0]
            entry_id = self._core.accepted(keys, item, verdict)
            if entry_id is not None:
                return entry_id
            if self._core.refused(keys, item, verdict) is Next.RESEND:
                await self._shape(keys, item)  # raises SchemaConflict if it cannot fit
            elif deadline is None or not await self._wait_for_room(keys, deadline):
                raise self._core.backpressure(keys, verdict)
            verdict = None

    async def _wait_for_room(self, keys: wire.Keys, deadline: float) -> bool:
        delay = 0.05
        while time.monotonic() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            pipe = self.redis.pipeline()
            pipe.hget(keys.pending, "bytes")
            pipe.xlen(keys.delta)
            pending, length = await pipe.execute()
            if int(pending or 0) < self.settings.max_pending_bytes or not length:
                return True
        return False

    # --- reading, configuration, dead letters: ``Producer``'s, in a thread -------------

    async def read(self, table: str, columns: Sequence[str] | None = None,
                   filter: pc.Expression | None = None, *, min_id: str | None = None,
                   timeout_s: float = 10.0) -> pa.RecordBatchReader:
        """``Producer.read``: every row of ``table``, flushed or not, as one consistent
        snapshot (``columns``, ``filter``, ``min_id`` and ``timeout_s`` as there; ``min_id``
        takes the IDs this producer's ``append`` returns, ``<shard>:<id>`` ones too).

        Runs ``Producer.read`` in a thread (``asyncio.to_thread``) on a blocking producer
        made from this one's settings (``_blocking``): one read algorithm for both. The
        snapshot is taken before this returns; the lake's files are read as the reader is
        iterated, so iterate a large one in a thread too
        (``await asyncio.to_thread(reader.read_all)``)."""
        return await asyncio.to_thread(self._blocking().read, table, columns, filter,
                                       min_id=min_id, timeout_s=timeout_s)

    async def table_config(self, table: str) -> TableConfig:
        """``Producer.table_config``, in a thread (see ``read``)."""
        return await asyncio.to_thread(self._blocking().table_config, table)

    async def configure(self, table: str, **changes: Any) -> TableConfig:
        """``Producer.configure``: change the table's configuration (shards, shard key,
        format, partitioning...), return the new one; in a thread (see ``read``). This
        producer routes by the new shard count within ``ROUTE_TTL_S`` (5 s), as any
        producer does; its own change takes effect for it at once."""
        config = await asyncio.to_thread(self._blocking().configure, table, **changes)
        self._core.routes.pop(table, None)
        return config

    async def replay_dead(self, table: str) -> tuple[int, int]:
        """``Producer.replay_dead``: re-append the dead letters of ``table`` (each to its
        shard) that now decode and fit; ``(replayed, still_dead)``. In a thread (see
        ``read``)."""
        return await asyncio.to_thread(self._blocking().replay_dead, table)

    def _blocking(self) -> Producer:
        """A blocking ``Producer`` with this one's settings, made on first use, for the
        calls that run ``Producer``'s code in a thread. It has connections of its own,
        to ``settings.redis_url`` (not to a ``client`` this producer was given)."""
        if self._sync is None:
            self._sync = Producer(settings=self.settings)
        return self._sync

    # --- flushing ---------------------------------------------------------------------

    async def _maybe_trigger(self, keys: wire.Keys) -> None:
        """The size trigger of ``Producer._maybe_trigger``."""
        if not self._core.trigger_due(keys):
            return
        key_list, arg_list = DUE.argv(due_keys(keys),
                                      due_args(self.settings.lease_ms, 0, force=True))
        if await self.redis.eval(DUE.source, len(key_list), *key_list, *arg_list):
            await self._send_or_unmark(keys)

    async def flush(self, table: str) -> bool:
        """``Producer.flush``: enqueue ``flush_table(table)`` now, unless one is queued;
        for a sharded table, one per shard (each takes its shard's mark)."""
        sent = False
        for keys in await self._table_shards(table):
            if await self.redis.set(keys.queued, b"1", nx=True, px=self.settings.lease_ms):
                await self._send_or_unmark(keys)
                sent = True
        return sent

    async def request_flush(self, table: str) -> None:
        """``Producer.request_flush``: ask for a flush (of every shard) through Redis
        alone."""
        for keys in await self._table_shards(table):
            await self.redis.hset(keys.sched, wire.FIELD_FLUSH_REQUESTED,
                                  int(time.time() * 1000))

    async def _table_shards(self, table: str) -> list[wire.Keys]:
        """``shards.table_shards``: every shard of ``table`` that may hold data."""
        self._core.keys(table)  # raises InvalidTableName
        ever = await self.redis.hget(wire.sharded_key(self.settings.key_prefix), table)
        return shards.all_shards(self.settings.key_prefix, table,
                                 {table: shards.count_of(ever)})

    async def _send_or_unmark(self, keys: wire.Keys) -> None:
        """Send ``flush_table`` (Celery's client blocks: in a thread); if that fails, remove
        the ``{T}:queued`` mark so the next request can queue it (``due.send_or_unmark``)."""
        if self._celery is None:
            self._celery = celery_app(self.settings.broker_url)
        try:
            await asyncio.to_thread(self._celery.send_task, wire.FLUSH_TASK,
                                    args=[keys.table], queue=wire.QUEUE)
        except Exception:
            await self.redis.delete(keys.queued)
            raise

    async def close(self) -> None:
        await self.redis.aclose()
        for master in self._masters.values():
            await master.aclose(close_connection_pool=True)
        if self._celery is not None:
            self._celery.close()
        if self._sync is not None:
            self._sync.close()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBatcher(Buffer):
    """``producer.batcher.Batcher`` for asyncio (see the module doc and docs/batching.md):
    a task of the event loop merges the writes and appends them with
    ``AsyncProducer.append``. ``await b.close()`` or ``async with`` drains it."""

    def __init__(self, producer: AsyncProducer, *, linger_ms: float, max_rows: int,
                 max_bytes: int, max_buffer_bytes: int,
                 append_timeout_s: float | None) -> None:
        super().__init__(linger_ms=linger_ms, max_rows=max_rows, max_bytes=max_bytes,
                         max_buffer_bytes=max_buffer_bytes, append_timeout_s=append_timeout_s)
        self.producer = producer
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def write(self, table: str, data: Any) -> asyncio.Future[str]:
        """Buffer one row (a dict), a list of dicts, or anything ``append`` takes; return
        a future of the entry ID of the merged batch that holds it. Raises at once for bad
        input, and ``BufferFull`` if the buffer is full."""
        if self._closing:
            raise RuntimeError("this batcher is closed; make a new one with "
                               "AsyncProducer.batcher()")
        key, rows, nbytes, data = classify(table, data)
        nbytes = nbytes or self.estimate(table, rows)
        if self._buffered and self._buffered + nbytes > self.max_buffer_bytes:
            self._send_all()
            raise BufferFull(self._buffered, self.max_buffer_bytes, 0.0)
        batch = self._open.get(key)
        if batch is None:
            if table not in self._tables:
                self.producer._core.keys(table)  # raises InvalidTableName
                self._tables.add(table)
            batch = self._open[key] = _Batch(table, names_of(key),
                                             time.monotonic() + self.linger_s)
            self._start()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._idle.clear()
        if self._add(key, batch, data, future, rows, nbytes):
            self._wake.set()
        return future

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()  # a new deadline

    def _send_all(self) -> None:
        self._ready.extend(self._open.values())
        self._open.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Send everything buffered now and wait until every write so far is resolved."""
        self._send_all()
        if self.unacknowledged:
            if self._task is None or self._task.done():
                self._start()
            await self._idle.wait()

    async def close(self) -> None:
        """Send everything buffered, wait for it, and stop the batcher's task."""
        await self.flush()
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> AsyncBatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            nearest = self._take_due(now)
            if self._ready:
                batches, self._ready = self._ready, []
                for batch in batches:
                    await self._deliver(batch)
                continue
            if not self.unacknowledged:
                self._idle.set()
            if self._closing and not self._open:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       None if nearest is None else max(0.0, nearest - now))
            except TimeoutError:
                pass

    async def _deliver(self, batch: _Batch) -> None:
        outcomes: list[Any] = [None] * len(batch.items)
        try:
            if batch.items:
                await self._append(batch, list(range(len(batch.items))), outcomes)
        except BaseException as exc:  # never leave a future unresolved
            outcomes = [exc if o is None else o for o in outcomes]
            if not isinstance(exc, Exception):
                raise
        finally:
            for future, outcome in zip(batch.futures, outcomes, strict=True):
                if future.done() or outcome is None:
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self.unacknowledged -= batch.rows
            self._buffered -= batch.nbytes

    async def _append(self, batch: _Batch, picked: Sequence[int],
                      outcomes: list[Any]) -> None:
        """``Batcher._append``: halving on ``InvalidInput`` to the writes at fault."""
        try:
            arrow = self._merge(batch, picked)
            entry_id: Any = await self.producer.append(batch.table, arrow,
                                                       timeout_s=self.append_timeout_s)
        except InvalidInput as exc:
            if len(picked) > 1:
                for part in halves(picked):
                    await self._append(batch, part, outcomes)
                return
            entry_id = exc
        except Exception as exc:
            entry_id = exc
        for n in picked:
            outcomes[n] = entry_id
