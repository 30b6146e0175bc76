"""The Celery tasks: thin wrappers that parse arguments, call plain code and map errors.

* ``flush_table(table)``: runs ``Flusher.flush`` (of one shard of a sharded table: the one
  whose ``queued`` mark the message takes, ``take_shard``). Transient errors (Redis connection,
  storage) are retried with exponential backoff; a fenced flush (``LeaseLost``) ends with a
  warning, since the flusher that fenced it does the work; a table whose state breaks the
  protocol is marked stuck by the flusher and the task returns ``status: "stuck"`` (never
  retried in a loop). A flush stops taking new files at half its time limit and, if more
  is pending, queues its own continuation.
* ``deltaflush.schedule_flushes``: what beat sends every ``flush_interval_s``; it also
  queues the maintenance of lake tables that are due (``workers.maintenance``).
* ``deltaflush.maintain_table(table)``: one maintenance run of a lake table (compaction,
  snapshot expiry, orphan files) following its policy; transient errors are retried.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import redis
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutting_down

from producer import shards, wire
from producer.client import connect
from producer.cluster import REDIRECTS
from producer.due import queue_flush
from producer.errors import InvalidTableName, LeaseLost, ReplicationTimeout

from .app import app, settings
from .doctor import startup
from .flusher import Flusher
from .logs import configure_logging, json_logs
from .maintenance import ROUND_S, NotALakeTable, maintain
from .maintenance import enqueue_due as enqueue_maintenance
from .scheduler import enqueue_due
from .storage import Storage

log = logging.getLogger(__name__)

#: Errors worth retrying with backoff: the next try may well succeed. On a Redis Cluster:
#: a slot moving or failing over, and replicas slow to acknowledge a flush's writes.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError, ReplicationTimeout,
             *REDIRECTS)
MAX_BACKOFF_S = 60

_runtime: tuple[int, redis.Redis, Flusher] | None = None
SWEEP_EVERY_S = 300
_last_sweep = float("-inf")
_last_maintenance_round = float("-inf")


def runtime() -> tuple[redis.Redis, Flusher]:
    """This process's Redis client and flusher, created after fork."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        client = connect(settings.redis_url)
        _runtime = (os.getpid(), client, Flusher(client, Storage(settings.storage_uri), settings))
    return _runtime[1], _runtime[2]


def send_flush(table: str) -> None:
    app.send_task(wire.FLUSH_TASK, args=[table], queue=wire.QUEUE)


def send_maintain(table: str) -> None:
    app.send_task(wire.MAINTAIN_TASK, args=[table], queue=wire.QUEUE)


if json_logs():  # DELTAFLUSH_LOG_JSON=1: JSON lines instead of Celery's own format

    @setup_logging.connect
    def _setup_logging(loglevel: Any = None, **_: Any) -> None:
        configure_logging(loglevel or logging.INFO)


def _stopping_key(hostname: str) -> str:
    return f"{settings.key_prefix}:stopping:{hostname}"


@worker_shutting_down.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    """Warm shutdown (SIGTERM): running flushes finish their current file (and the one
    they read ahead, if any), then stop and queue their continuation for another worker."""
    try:
        runtime()[0].set(_stopping_key(str(sender)), b"1", ex=3600)
    except redis.RedisError as exc:
        log.warning("could not tell running flushes to stop: %s", exc)


@worker_init.connect
def _start_up_checks(**_: Any) -> None:
    """Stop, with the reason, a worker that could not flush or would lose data."""
    startup(settings)  # workers.doctor: the checks of `deltaflush doctor`


@worker_ready.connect
def _check_redis(sender: Any = None, **_: Any) -> None:
    try:
        runtime()[0].delete(_stopping_key(str(getattr(sender, "hostname", ""))))
    except redis.RedisError as exc:
        log.warning("could not clear the stop request of this worker: %s", exc)


@app.task(name=wire.FLUSH_TASK, bind=True, max_retries=None)
def flush_table(self: Any, table: str) -> dict[str, Any]:
    if not wire.valid_table_name(table):
        raise InvalidTableName(table)
    keys = wire.Keys(settings.key_prefix, table)
    try:
        client, flusher = runtime()
    except TRANSIENT as exc:  # Redis unreachable: nothing to hold beat off with
        raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S,
                                                2 ** min(self.request.retries, 6))) from exc
    try:
        # From here on a new request may be queued; this run takes what is pending now.
        shard = take_shard(client, table)
        keys = keys.for_shard(shard or 0)
        stopping = _stopping_key(self.request.hostname or "")
        budget, stop = settings.task_time_limit_s / 2, lambda: bool(client.exists(stopping))
        result = flusher.flush_shards(table, budget, stop) if shard is None else \
            flusher.flush(table, budget, stop, shard=shard)
    except LeaseLost as exc:
        log.warning("flush of %s fenced: %s", table, exc)
        return {"table": table, "status": "fenced", "error": str(exc)}
    except TRANSIENT as exc:
        countdown = min(MAX_BACKOFF_S, 2 ** min(self.request.retries, 6))
        log.warning("flush of %s failed (%s); retry %d in %ss", table, exc,
                    self.request.retries + 1, countdown)
        try:  # hold beat off while the retry waits
            client.set(keys.queued, b"1", px=int((countdown + settings.lease_s) * 1000))
        except redis.RedisError:
            pass
        raise self.retry(exc=exc, countdown=countdown) from exc
    if result.more:  # the time budget ran out or the worker is stopping: hand the rest on
        for more in ([keys] if shard is not None else
                     shards.table_shards(client, settings.key_prefix, table)):
            queue_flush(client, more, settings.lease_ms, send_flush)
    return result.as_dict()


def take_shard(client: redis.Redis, table: str) -> int | None:
    """The shard this ``flush_table(table)`` message flushes: it takes (deletes) one shard's
    ``queued`` mark, set by whoever queued the message (beat's round, a producer's size
    trigger or ``flush``, a continuation): one message per marked shard, so the shards of a
    table are flushed in parallel by as many workers. A table never sharded: shard 0. A
    message whose mark is gone (it expired, or the message was sent by hand): None, flush
    every shard in turn."""
    count = shards.shards_ever(client, settings.key_prefix, table)
    if count == 1:
        client.delete(wire.Keys(settings.key_prefix, table).queued)
        return 0
    start = random.randrange(count)
    for i in range(count):
        shard = (start + i) % count
        if client.delete(wire.Keys(settings.key_prefix, table, shard).queued):
            return shard
    return None


@app.task(name=wire.SCHEDULE_TASK, ignore_result=True)
def schedule_flushes() -> int:
    client, flusher = runtime()
    sent = enqueue_due(client, settings.key_prefix, settings.lease_ms, send_flush,
                       interval_ms=int(settings.flush_interval_s * 1000))
    # Temporary files of flushers killed long ago (past twice the hard time limit). Rounds
    # run every second; a listing of the storage (an S3 LIST) every few minutes is enough.
    global _last_sweep
    if time.monotonic() - _last_sweep > SWEEP_EVERY_S:
        _last_sweep = time.monotonic()
        flusher.storage.sweep_temp(older_than_s=2 * settings.task_time_limit_s)
    global _last_maintenance_round
    if time.monotonic() - _last_maintenance_round > min(ROUND_S, settings.flush_interval_s):
        _last_maintenance_round = time.monotonic()
        enqueue_maintenance(client, settings.key_prefix, send_maintain)
    return len(sent)


@app.task(name=wire.MAINTAIN_TASK, bind=True, max_retries=8)
def maintain_table(self: Any, table: str) -> dict[str, Any]:
    if not wire.valid_table_name(table):
        raise InvalidTableName(table)
    client, flusher = runtime()
    try:
        return maintain(client, flusher, table)
    except NotALakeTable as exc:  # its format changed since it was scheduled: nothing to do
        return {"table": table, "status": "skipped", "error": str(exc)}
    except TRANSIENT as exc:
        countdown = min(MAX_BACKOFF_S, 2 ** min(self.request.retries, 6))
        log.warning("maintenance of %s failed (%s); retry %d in %ss", table, exc,
                    self.request.retries + 1, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
