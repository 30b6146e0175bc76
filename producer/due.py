"""Whether a table gets a ``flush_table`` now: one script shared by beat's scheduling rounds
and the producer's size trigger, so both deduplicate the same way.

A table is due when it has something pending (entries in its delta, or a claim left by a
crashed flusher), no flush of it is queued (``{T}:queued``) and none is running
(``{T}:lease``), and, for a scheduled round, its flush interval has passed since it was
last scheduled (``{T}:sched``: ``interval_ms`` set by the table's configuration, else the
global default; ``last_ms``). A size-triggered request skips the interval. The script then
sets ``{T}:queued`` for a lease period, so a lost message delays the table by at most that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import wire

# KEYS: queued, lease, delta, claim, sched
# ARGV: queued ttl ms, default interval ms, force (1: ignore the interval)
DUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('XLEN', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '1' then
  local interval = tonumber(redis.call('HGET', KEYS[5], 'interval_ms') or ARGV[2])
  local last = tonumber(redis.call('HGET', KEYS[5], 'last_ms') or '0')
  if now - last < interval then return 0 end
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('HSET', KEYS[5], 'last_ms', now)
return 1
"""


def due_keys(keys: wire.Keys) -> list[str]:
    return [keys.queued, keys.lease, keys.delta, keys.claim, keys.sched]


def send_or_unmark(client: Any, keys: wire.Keys, send: Callable[[str], object]) -> None:
    """Send ``flush_table`` for a table just marked ``{T}:queued``; if the send fails,
    remove the mark so the next round or request can queue it."""
    try:
        send(keys.table)
    except Exception:
        client.delete(keys.queued)
        raise


def queue_flush(client: Any, keys: wire.Keys, ttl_ms: int,
                send: Callable[[str], object]) -> bool:
    """Mark and send a flush unless one is queued already (a running one does not count:
    the new one runs after it and takes what arrived meanwhile). True if sent."""
    if not client.set(keys.queued, b"1", nx=True, px=ttl_ms):
        return False
    send_or_unmark(client, keys, send)
    return True
