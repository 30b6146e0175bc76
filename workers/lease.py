"""A per-table lease with a fencing token, renewed in the background while a flush works.

``acquire`` draws a fresh token from ``{table}:fence`` (INCR, so tokens only grow) and sets
``{table}:lease`` to it with ``SET NX PX``-semantics, in one script. Every step that changes
the table's state in Redis (recording a claim, committing) runs a script that first checks
that the lease still holds *this* token: a flusher that was frozen past its lease and wakes
up finds another token (or none) there, and its late writes fail. That is the fence.

The renewer thread extends the lease every third of its length. If a renewal finds another
token, or no renewal succeeded for a whole lease period (Redis unreachable), the lease is
marked lost and :meth:`Lease.check` raises :class:`LeaseLost` at the flusher's next step.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from producer.errors import LeaseLost
from producer.wire import Keys

log = logging.getLogger(__name__)

ACQUIRE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """The lease one flusher holds on one table. Use :func:`acquire`; a context manager."""

    def __init__(self, client: redis.Redis, keys: Keys, token: int, lease_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.token = token
        self.lease_ms = lease_ms
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{keys.table}", daemon=True
        )

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._release(keys=[self.keys.lease], args=[self.token])
        except redis.RedisError as err:  # it expires by itself
            log.warning("could not release the lease of %s: %s", self.keys.table, err)

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease is, or may be, held by someone else now."""
        if time.monotonic() - self._last_ok > self.lease_ms / 1000:
            self._lost.set()
        if self._lost.is_set():
            raise LeaseLost(
                f"lost the lease on table {self.keys.table!r} (token {self.token}); "
                "another flusher may own it now"
            )

    def _run(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                if self._renew(keys=[self.keys.lease], args=[self.token, self.lease_ms]):
                    self._last_ok = time.monotonic()
                else:
                    self._lost.set()
                    return
            except redis.RedisError as err:
                log.warning("lease renewal of %s failed: %s", self.keys.table, err)
                if time.monotonic() - self._last_ok > self.lease_ms / 1000:
                    self._lost.set()
                    return


def acquire(client: redis.Redis, keys: Keys, lease_ms: int) -> Lease | None:
    """Take the table's lease with a new fencing token, or return None if another holds it."""
    token = client.register_script(ACQUIRE_LUA)(keys=[keys.lease, keys.fence], args=[lease_ms])
    if token is None:
        return None
    return Lease(client, keys, int(token), lease_ms)
