"""The producer: what application code imports to append batches and ask for flushes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import wire
from .convert import conform, to_table
from .errors import InvalidTableName, SchemaConflict
from .settings import Settings

log = logging.getLogger(__name__)

# Check the batch's schema against the table's and append it, atomically. The first append
# sets the schema. Touches only keys of one table (one Cluster slot).
#   KEYS: schema, delta, pending    ARGV: schema bytes, payload, rows
#   returns {1, entry_id} or {0, stored schema bytes}
APPEND_LUA = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return {0, current}
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1])
end
local id = redis.call('XADD', KEYS[2], '*', 'arrow', ARGV[2], 'rows', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'rows', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'bytes', string.len(ARGV[2]))
return {1, id}
"""


def connect(url: str) -> redis.Redis:
    """A Redis client for the delta tier.

    Commands are not retried by the client: an append whose reply was lost may or may not
    have been applied, and a blind retry could add the batch twice. Callers decide; the
    connection pool reconnects by itself on the next call.
    """
    return redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        socket_keepalive=True,
    )


class Producer:
    """Append Arrow batches to tables and ask for flushes.

    ``Producer()`` reads its settings from the environment; ``redis_url``, ``broker_url`` and
    ``key_prefix`` (or a whole ``settings``) override them. Thread-safe: the Redis client
    has a connection pool.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        broker_url: str | None = None,
        *,
        key_prefix: str | None = None,
        settings: Settings | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(
            redis_url=redis_url, broker_url=broker_url, key_prefix=key_prefix
        )
        self.redis = client if client is not None else connect(self.settings.redis_url)
        self._append = self.redis.register_script(APPEND_LUA)
        self._registered: set[str] = set()
        self._schemas: dict[str, pa.Schema] = {}
        self._celery: Any = None

    # --- appending --------------------------------------------------------------------

    def append(self, table: str, data: Any) -> str:
        """Append one batch; return its stream entry ID once Redis has accepted it.

        ``data`` is a ``pyarrow.Table``, ``pyarrow.RecordBatch``, ``pandas.DataFrame`` or a
        list of dicts. Raises an ``InvalidInput`` (a ``ValueError``) and writes nothing if
        the table name or the data is invalid or its schema conflicts with the table's.
        """
        keys = self._keys(table)
        arrow = self._prepare(table, data)
        self._register(table)
        return self._send(keys, table, arrow)

    def append_many(self, table: str, batches: Iterable[Any]) -> list[str]:
        """Append several batches in one pipelined round trip; return their entry IDs.

        Every batch is converted and checked against the table's known schema first, so a
        bad batch raises before anything is sent. If the table's schema changed in Redis
        meanwhile, the batches that do not match are refused by Redis and re-checked one
        by one; the others are appended.
        """
        keys = self._keys(table)
        arrows = [self._prepare(table, data) for data in batches]
        if not arrows:
            return []
        self._register(table)
        pipe = self.redis.pipeline(transaction=False)
        for arrow in arrows:
            self._append(keys=self._script_keys(keys), args=self._script_args(arrow), client=pipe)
        replies = pipe.execute()
        ids: list[str] = []
        for arrow, reply in zip(arrows, replies, strict=True):
            ok, value = reply
            ids.append(value.decode() if ok else self._send(keys, table, arrow))
        return ids

    def _keys(self, table: str) -> wire.Keys:
        if not wire.valid_table_name(table):
            raise InvalidTableName(table)
        return wire.Keys(self.settings.key_prefix, table)

    def _prepare(self, table: str, data: Any) -> pa.Table:
        arrow = to_table(data)
        known = self._schemas.get(table)
        if known is not None and not arrow.schema.equals(known):
            arrow = conform(arrow, known, table)
        return arrow

    def _register(self, table: str) -> None:
        # Registered before the first XADD, so no batch is ever in a stream whose table is
        # unknown to the scheduler. Idempotent; done once per table per process.
        if table not in self._registered:
            self.redis.sadd(wire.tables_key(self.settings.key_prefix), table)
            self._registered.add(table)

    @staticmethod
    def _script_keys(keys: wire.Keys) -> list[str]:
        return [keys.schema, keys.delta, keys.pending]

    @staticmethod
    def _script_args(arrow: pa.Table) -> list[Any]:
        payload = wire.encode_batches(arrow.schema, arrow.to_batches())
        return [wire.serialize_schema(arrow.schema), payload, arrow.num_rows]

    def _send(self, keys: wire.Keys, table: str, arrow: pa.Table) -> str:
        for _ in range(2):
            ok, value = self._append(keys=self._script_keys(keys), args=self._script_args(arrow))
            if ok:
                self._schemas.setdefault(table, arrow.schema)
                return str(value.decode())
            stored = wire.deserialize_schema(value)
            self._schemas[table] = stored
            arrow = conform(arrow, stored, table)
        # conform() returned a table with the stored schema, yet Redis still refused it: the
        # schema changed again in between. Report rather than loop.
        raise SchemaConflict(table, "*", str(self._schemas[table]), str(arrow.schema))

    # --- flushing ---------------------------------------------------------------------

    def flush(self, table: str) -> bool:
        """Enqueue ``flush_table(table)`` now, unless one is already queued.

        Returns True if a task was sent. A flush that is already *running* does not stop a
        new one from being queued: it runs after, and takes whatever arrived meanwhile.
        """
        keys = self._keys(table)
        # The marker expires after a lease period, so a lost message never blocks the table.
        if not self.redis.set(keys.queued, b"1", nx=True, px=self.settings.lease_ms):
            return False
        try:
            self._celery_app().send_task(wire.FLUSH_TASK, args=[table], queue=wire.QUEUE)
        except Exception:
            self.redis.delete(keys.queued)
            raise
        return True

    def _celery_app(self) -> Any:
        if self._celery is None:
            from celery import Celery

            app = Celery("deltaflush-producer", broker=self.settings.broker_url,
                         set_as_current=False)
            app.conf.update(task_serializer="json", accept_content=["json"])
            self._celery = app
        return self._celery

    def close(self) -> None:
        self.redis.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
