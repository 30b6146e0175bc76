"""Redis Cluster mode: detect a cluster, reach the master of a table's slot, wait for replicas.

``DELTAFLUSH_REDIS_URL`` may name any node of a Redis Cluster: :func:`is_cluster_url` asks
that node (``INFO cluster``) and ``producer.client.connect`` then returns a
``redis.cluster.RedisCluster``, which routes each command to the master of its key's slot
and follows ``MOVED``/``ASK`` by itself. Every key of one table shares one slot (the hash tag
``{<table>}``), so every transaction and script of deltaflush touches one slot; what spans
tables is plain commands (the registry ``{prefix}:tables``, ``status``: the cluster
client's pipelines, split by node) or one script per table, pipelined per master
(:func:`by_master`: scheduling rounds).

Two things the cluster client cannot do, done here on a plain client of the slot's master
(:func:`on_master`):

* the append transaction: several ``MULTI``/``EXEC`` in one round trip;
* ``WAIT``, which must follow the writes it waits for *on the same connection* (it waits for
  the replication offset of that connection's last write; the cluster client would send it
  to every master on connections of their own).

:func:`on_master` retries on the replies a slot gives while it moves or fails over
(``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``, a dead master's connection errors),
refreshing the map of slots in between. After a redirect nothing ran; after a lost
connection it may have, so only what is idempotent is tried again then: the append (its
batch ID), not the flusher's lease and claim scripts (a new flush resumes instead).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from .errors import ConfigError, ReplicationTimeout

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Replies of a slot that is moving or failing over: nothing of the command ran; try again
#: once the map of slots is refreshed. (``MovedError`` is an ``AskError``.)
REDIRECTS = (AskError, TryAgainError, ClusterDownError, ClusterError, SlotNotCoveredError)
#: How long :func:`on_master` keeps trying: a failover takes the cluster's node timeout
#: plus an election (seconds).
RETRY_S = 30.0


def is_cluster_url(url: str) -> bool:
    """Whether the Redis that ``url`` names is a node of a Redis Cluster (``cluster_enabled:1``).
    Raises Redis's error if it cannot be reached."""
    probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    finally:
        probe.close()


def names_a_cluster(url: str, retry: Retry) -> bool:
    """Whether ``url`` names a Redis Cluster node; a server that refuses ``INFO`` (an ACL
    without ``+info``, an embedded Redis-compatible server) is taken for a standalone
    Redis. Unreachable: Redis's error, after ``retry``'s attempts."""
    try:
        return bool(retry.call_with_retry(lambda: is_cluster_url(url), lambda _: None))
    except redis.ResponseError:
        return False


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (``redis.cluster.RedisCluster``)."""
    return isinstance(client, RedisCluster)


def require_broker(redis_url: str, broker_url: str) -> None:
    """Refuse a Celery broker on the cluster itself: kombu's Redis transport needs one Redis
    (its queues are keys of many slots, its commands span them)."""
    if broker_url == redis_url:
        shown = re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", redis_url)
        raise ConfigError(
            f"DELTAFLUSH_REDIS_URL={shown} names a Redis Cluster, which cannot be the "
            "Celery broker. Set DELTAFLUSH_BROKER_URL to a broker of its own: RabbitMQ "
            "(amqp://user:password@host:5672/vhost, recommended) or a standalone Redis "
            "(docs/cluster.md)")


def master_for(client: Any, key: str) -> redis.Redis:
    """A plain client of the master serving ``key``'s slot (``client`` itself when it is
    not a cluster client)."""
    if not is_cluster(client):
        return client  # type: ignore[no-any-return]
    node = client.get_node_from_key(key)
    return client.get_redis_connection(node)  # type: ignore[no-any-return]


def by_master(client: Any, keys: Sequence[str]) -> list[tuple[redis.Redis, list[int]]]:
    """The positions in ``keys`` grouped by the master that serves them, each with a plain
    client of it (one group of ``client`` itself when it is not a cluster client): for
    pipelines of scripts over many tables, which a cluster pipeline refuses."""
    if not is_cluster(client):
        return [(client, list(range(len(keys))))] if keys else []
    groups: dict[str, tuple[redis.Redis, list[int]]] = {}
    for i, key in enumerate(keys):
        node = client.get_node_from_key(key)
        if node.name not in groups:
            groups[node.name] = (client.get_redis_connection(node), [])
        groups[node.name][1].append(i)
    return list(groups.values())


def masters(client: Any) -> list[tuple[str, redis.Redis]]:
    """``(host:port, plain client)`` of every master (of ``client`` alone when standalone)."""
    if not is_cluster(client):
        kwargs = client.connection_pool.connection_kwargs
        return [(f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}", client)]
    return [(node.name, client.get_redis_connection(node))
            for node in client.get_primaries()]


def on_master(client: Any, key: str, run: Callable[[redis.Redis], T],
              retry_s: float = RETRY_S, idempotent: bool = True) -> T:
    """``run(master)`` with a plain client of the master of ``key``'s slot; on a cluster,
    again (with the slots re-read) while the slot moves or fails over, for up to
    ``retry_s``: after a redirect (nothing ran), and, if ``run`` is ``idempotent``, after a
    lost connection too (a dead master). Standalone: ``run(client)``, once."""
    if not is_cluster(client):
        return run(client)
    retried: tuple[type[Exception], ...] = REDIRECTS + (
        (redis.ConnectionError, redis.TimeoutError) if idempotent else ())
    deadline = time.monotonic() + retry_s
    delay = 0.05
    while True:
        try:
            return run(master_for(client, key))
        except retried as exc:
            if time.monotonic() > deadline:
                raise
            log.info("the slot of %s is moving or failing over (%s: %s); trying again",
                     key, type(exc).__name__, exc)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, ClusterError):
            pass  # the cluster is still electing: the next try re-reads it


def queue_wait(pipe: Any, replicas: int, timeout_ms: int) -> None:
    """Queue ``WAIT replicas timeout_ms`` after the writes on ``pipe`` (a pipeline of a plain
    client: one connection)."""
    pipe.execute_command("WAIT", replicas, timeout_ms)


def check_acked(acked: int, replicas: int, timeout_ms: int, what: str,
                batch_ids: tuple[str, ...] = ()) -> None:
    """Raise ``ReplicationTimeout`` if ``WAIT`` counted fewer than ``replicas``."""
    if int(acked) < replicas:
        raise ReplicationTimeout(what, int(acked), replicas, timeout_ms, batch_ids)


def replicated(client: Any, key: str, replicas: int, timeout_ms: int,
               queue: Callable[[Any], None], idempotent: bool = False
               ) -> tuple[list[Any], int]:
    """Run the commands ``queue(pipe)`` queues on the master of ``key``'s slot, then
    ``WAIT`` on the same connection for ``replicas`` replicas to hold them (up to
    ``timeout_ms``); return the commands' replies and how many replicas acknowledged
    (check it with :func:`check_acked`). A command's error reply raises as it is."""
    def run(master: redis.Redis) -> tuple[list[Any], int]:
        pipe = master.pipeline(transaction=False)
        queue(pipe)
        queue_wait(pipe, replicas, timeout_ms)
        replies = pipe.execute(raise_on_error=True)
        return list(replies[:-1]), int(replies[-1])
    return on_master(client, key, run, idempotent=idempotent)
