"""The Celery app, built in one place: ``celery -A workers.app worker|beat|flower``.

Settings come from the environment once, here, at the entry point. The configuration fits
long, idempotent tasks: late acks and requeue when a worker process dies (a flush that is
delivered twice is harmless, see ``workers.flusher``), one message prefetched per process,
JSON only, and a broker visibility timeout far above the task's time limit so that a slow
flush is never handed to a second worker while the first still runs.

On a Redis Cluster (``DELTAFLUSH_REDIS_URL`` names a node of one, asked once here) the broker
must be a service of its own (RabbitMQ, or a standalone Redis: ``producer.cluster``); RedBeat
keeps its schedule on the cluster, every key of it in one slot (its prefix is a hash tag),
and task results go to the broker (RPC replies on RabbitMQ), since Celery's Redis result
backend needs one Redis.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from producer import cluster, wire
from producer.settings import Settings


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def on_cluster(settings: Settings) -> bool:
    """Whether the delta tier is a Redis Cluster. An unreachable Redis counts as standalone
    here: the start-up checks (``workers.doctor``) stop a worker that cannot reach it."""
    try:
        return cluster.is_cluster_url(settings.redis_url)
    except (redis.RedisError, ValueError):
        return False


def make_app(settings: Settings, redis_cluster: bool = False) -> Celery:
    if redis_cluster:
        cluster.require_broker(settings.redis_url, settings.broker_url)
    app = Celery("deltaflush", broker=settings.broker_url, include=["workers.tasks"])
    limit = settings.task_time_limit_s
    # on a cluster, every RedBeat key in one slot: the prefix is a hash tag
    beat_prefix = (f"{{{settings.key_prefix}:redbeat}}" if redis_cluster
                   else f"{settings.key_prefix}:redbeat")
    conf: dict[str, Any] = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=limit * 0.9,
        broker_transport_options={"visibility_timeout": max(3600, int(limit * 4))},
        broker_connection_retry_on_startup=True,
        # On a broker connection loss, let running flushes finish: their messages may be
        # redelivered, which is harmless (leases). Cancelling them made a worker hit
        # Celery/kombu 5.7's "Unrecoverable error" on a Redis restart far more often.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=[_queue(wire.QUEUE), _queue(wire.SCHEDULE_QUEUE)],
        task_default_queue=wire.QUEUE,
        task_routes={
            wire.FLUSH_TASK: {"queue": wire.QUEUE},
            wire.SCHEDULE_TASK: {"queue": wire.SCHEDULE_QUEUE},
        },
        # Beat without a single point of failure: RedBeat keeps the schedule in Redis behind
        # a lock, so several `celery -A workers.app beat` replicas can run and one schedules;
        # if it dies, another takes over within a lease period.
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=settings.redis_url,
        # Explicit, or RedBeat falls back to broker_transport_options (the broker's, not
        # its Redis's) with a deprecation warning at every beat start.
        redbeat_redis_options={"cluster": True} if redis_cluster else {},
        redbeat_key_prefix=f"{beat_prefix}:",
        redbeat_lock_key=f"{beat_prefix}:lock",
        redbeat_lock_timeout=max(2, int(settings.lease_s)),
        beat_max_loop_interval=max(1, int(settings.lease_s) // 3),
        beat_schedule={
            "deltaflush-schedule-flushes": {
                "task": wire.SCHEDULE_TASK,
                # Every second, so per-table intervals shorter than the default are kept;
                # each table is scheduled at its own interval (workers.scheduler).
                "schedule": min(1.0, settings.flush_interval_s),
                # A round that waited longer than that is superseded by the next.
                "options": {"expires": min(1.0, settings.flush_interval_s)},
            }
        },
        # Flower: task events on, results shown in its task list.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        result_backend=_result_backend(settings, redis_cluster),
        result_expires=3600,
        worker_hijack_root_logger=True,
    )
    app.conf.update(conf)
    app.conf.deltaflush = settings
    return app


def _result_backend(settings: Settings, redis_cluster: bool) -> str:
    if not redis_cluster:
        return settings.redis_url
    return "rpc://" if settings.broker_url.startswith(("amqp", "pyamqp")) else \
        settings.broker_url


settings = Settings.from_env()
redis_cluster = on_cluster(settings)
app = make_app(settings, redis_cluster)
