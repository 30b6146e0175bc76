"""Start-up checks of the Redis that holds the delta tier."""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)


def eviction_warning(client: redis.Redis) -> str | None:
    """A warning if Redis may evict deltaflush keys under memory pressure, else None.

    Only ``noeviction`` is safe: ``allkeys-*`` may drop unflushed delta entries, and
    ``volatile-*`` may drop leases and batch IDs (weakening fencing and retry dedup).
    """
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:  # CONFIG is disabled (managed Redis): cannot tell
        return None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy in (None, "noeviction"):
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict "
        "deltaflush data that has not reached Parquet. Set 'maxmemory-policy noeviction' "
        "(appends then fail loudly instead of losing data)."
    )


def warn_on_eviction(client: redis.Redis) -> None:
    message = eviction_warning(client)
    if message:
        log.warning(message)
