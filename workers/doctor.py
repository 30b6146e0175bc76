"""Can this deployment keep data? The checks of ``deltaflush doctor``, which every worker
also runs at start (``workers.tasks``, Celery's ``worker_init``).

* **Redis** (the delta tier) is reachable, and configured to keep what it holds:
  ``maxmemory-policy noeviction`` (any other policy may evict unflushed batches, leases or
  batch IDs under memory pressure, silently), and AOF on with ``appendfsync always`` (else a
  restart of Redis loses the batches not yet flushed, or the last second of them).
* **the broker** is reachable (workers get no flush without it), and is not the Redis
  Cluster itself (``producer.cluster``);
* on a **Redis Cluster**, every master is checked as above, one by one; with
  ``DELTAFLUSH_APPEND_REPLICAS`` > 0, every master has at least that many replicas;
* **the storage** is writable: a small probe file in the temporary folder, removed again.

What stops a worker (``fatal``): an unreachable Redis or broker, unwritable storage, and an
evicting Redis, which loses data in ordinary operation (a full Redis). A worker that starts
anyway would retry forever, or lose data without a word; one that stops says why, once, and
its supervisor's restarts make the reason visible. Redis without AOF (or without fsync on
every write) loses data only when Redis itself crashes, and deployments with replicas may
choose that: a warning. ``DELTAFLUSH_ALLOW_VOLATILE_REDIS=1`` accepts a Redis that may
evict or lose data (the demo's embedded in-memory server, throwaway setups): those findings
are then no warning at all. Redis without ``CONFIG`` (managed services) cannot be checked:
a warning that says so.

The checks are a list (``CHECKS``); a catalog check joins it when lake tables come.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis
from kombu import Connection

from producer import cluster
from producer.client import connect
from producer.errors import ConfigError
from producer.settings import Settings

from .blame import BROKER, REDIS, STORAGE, blame, describe, flat
from .storage import TMP_DIR, Storage

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"
ALLOW_VAR = "DELTAFLUSH_ALLOW_VOLATILE_REDIS"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``status`` is OK, WARN or FAIL (fatal for a worker)."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_redis(settings: Settings) -> list[Check]:
    try:
        with blame(REDIS, settings.redis_url, "cannot reach Redis"):
            client = connect(settings.redis_url)
            client.ping()
    except Exception as exc:  # noqa: BLE001 - reported, with the setting at fault
        return [Check("redis", FAIL, flat(exc))]
    try:
        where = describe(REDIS, settings.redis_url)
        if not cluster.is_cluster(client):
            return [Check("redis", OK, f"reachable: {where}"),
                    *durability(client, settings.allow_volatile_redis),
                    *replication(client, settings.append_replicas)]
        # A cluster: every master keeps what it holds, each checked on its own.
        nodes = cluster.masters(client)
        found = [Check("redis", OK, f"reachable: {where}, a Redis Cluster of {len(nodes)} "
                                    "masters")]
        for name, node in sorted(nodes, key=lambda n: n[0]):
            found += [Check(f"{c.name} {name}", c.status, c.detail) for c in
                      durability(node, settings.allow_volatile_redis)
                      + replication(node, settings.append_replicas)]
        return found
    finally:
        client.close()


def replication(client: redis.Redis, wanted: int) -> list[Check]:
    """Whether the master has the replicas ``DELTAFLUSH_APPEND_REPLICAS`` asks for (else
    every append and flush would time out waiting for them)."""
    if wanted <= 0:
        return []
    try:
        have = int(client.info("replication").get("connected_slaves", 0))
    except redis.ResponseError as exc:  # INFO refused (an ACL)
        return [Check("redis replicas", WARN, f"cannot read INFO replication ({flat(exc)})")]
    if have < wanted:
        return [Check("redis replicas", FAIL,
                      f"{have} replicas connected, DELTAFLUSH_APPEND_REPLICAS={wanted}: every "
                      "append and flush would time out waiting for them. Add replicas, or "
                      "lower DELTAFLUSH_APPEND_REPLICAS")]
    return [Check("redis replicas", OK, f"{have} replicas connected (at least {wanted})")]


def durability(client: redis.Redis, allow_volatile: bool = False) -> list[Check]:
    """Whether Redis keeps what it holds: eviction policy and AOF (see the module doc)."""
    try:
        config = {k.decode() if isinstance(k, bytes) else k:
                  v.decode() if isinstance(v, bytes) else v
                  for k, v in client.config_get("*").items()}
    except redis.ResponseError as exc:  # CONFIG disabled (managed Redis), or not a Redis
        if allow_volatile:
            return [Check("redis durability", OK, f"not checked ({ALLOW_VAR}=1)")]
        return [Check("redis durability", WARN,
                      f"cannot read Redis's configuration ({flat(exc)}): make sure it runs "
                      "with maxmemory-policy noeviction and appendonly yes")]
    found = []
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        found.append(Check("redis eviction", FAIL,
                           f"maxmemory-policy is {policy!r}: under memory pressure Redis may "
                           "evict batches not yet in Parquet. Set maxmemory-policy noeviction "
                           f"(or {ALLOW_VAR}=1 to accept losing data)"))
    else:
        found.append(Check("redis eviction", OK, "maxmemory-policy noeviction"))
    if config.get("appendonly", "no") != "yes":
        found.append(Check("redis persistence", WARN,
                           "appendonly is off: a restart of Redis loses every batch not yet "
                           "flushed. Set appendonly yes and appendfsync always"))
    elif config.get("appendfsync") != "always":
        found.append(Check("redis persistence", WARN,
                           f"appendfsync is {config.get('appendfsync')!r}: a crash of Redis "
                           "may lose the batches of the last second. Set appendfsync always"))
    else:
        found.append(Check("redis persistence", OK, "appendonly yes, appendfsync always"))
    if allow_volatile:
        found = [c if c.status == OK else Check(c.name, OK, f"{c.detail} (accepted: "
                                                 f"{ALLOW_VAR}=1)") for c in found]
    return found


def check_broker(settings: Settings) -> list[Check]:
    try:
        if cluster.is_cluster_url(settings.redis_url):
            cluster.require_broker(settings.redis_url, settings.broker_url)
    except ConfigError as exc:
        return [Check("broker", FAIL, str(exc))]
    except (redis.RedisError, ValueError):
        pass  # Redis unreachable or refusing INFO: check_redis says so
    try:
        with blame(BROKER, settings.broker_url, "cannot reach the broker"), \
                Connection(settings.broker_url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - reported, with the setting at fault
        return [Check("broker", FAIL, flat(exc))]
    return [Check("broker", OK, f"reachable: {describe(BROKER, settings.broker_url)}")]


def check_storage(settings: Settings) -> list[Check]:
    """Write and remove a probe file where flushes write their temporary files."""
    try:
        with blame(STORAGE, settings.storage_uri, "cannot write to the storage"):
            storage = Storage(settings.storage_uri)
            probe = posixpath.join(storage.root, TMP_DIR, "doctor",
                                   f"{socket.gethostname()}-{os.getpid()}-"
                                   f"{uuid.uuid4().hex[:8]}.probe")
            with storage.open_temp(probe) as out:
                out.write(b"deltaflush doctor probe\n")
            storage.fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - reported, with the setting at fault
        return [Check("storage", FAIL, flat(exc))]
    return [Check("storage", OK, f"writable: {describe(STORAGE, settings.storage_uri)}")]


#: Every check, in order. (A catalog check for lake tables belongs here.)
CHECKS: list[Callable[[Settings], list[Check]]] = [check_redis, check_broker, check_storage]


def run_checks(settings: Settings,
               checks: list[Callable[[Settings], list[Check]]] | None = None) -> list[Check]:
    return [c for check in (CHECKS if checks is None else checks) for c in check(settings)]


def failed(results: list[Check]) -> list[Check]:
    return [c for c in results if c.status == FAIL]


def startup(settings: Settings) -> None:
    """A worker's start: log every finding; stop the process with the reason if one is
    fatal (``SystemExit``, which Celery's signal dispatch does not swallow)."""
    results = run_checks(settings)
    for c in results:
        if c.status == WARN:
            log.warning("start-up check %s: %s", c.name, c.detail)
    fatal = failed(results)
    for c in fatal:
        log.critical("start-up check %s failed: %s", c.name, c.detail)
    if fatal:
        raise SystemExit("deltaflush worker stopped, a start-up check failed: "
                         + "; ".join(f"{c.name}: {c.detail}" for c in fatal))
