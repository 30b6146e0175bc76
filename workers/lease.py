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

from producer import scripts
from producer.cluster import check_acked, replicated
from producer.errors import LeaseLost
from producer.wire import Keys

log = logging.getLogger(__name__)

ACQUIRE = scripts.load("lease_acquire")
RENEW = scripts.load("lease_renew")
RELEASE = scripts.load("lease_release")


class Lease:
    """The lease one flusher holds on one table. Use :func:`acquire`; a context manager."""

    def __init__(self, client: redis.Redis, keys: Keys, token: int, lease_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.token = token
        self.lease_ms = lease_ms
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
            RELEASE(self.client, {"lease": self.keys.lease}, {"token": self.token})
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

    def held(self) -> bool:
        """Whether Redis still holds this lease's token (asks Redis, unlike ``check``)."""
        return self.client.get(self.keys.lease) == str(self.token).encode()

    def _run(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                if RENEW(self.client, {"lease": self.keys.lease},
                         {"token": self.token, "lease_ms": self.lease_ms}):
                    self._last_ok = time.monotonic()
                else:
                    self._lost.set()
                    return
            except redis.RedisError as err:
                log.warning("lease renewal of %s failed: %s", self.keys.table, err)
                if time.monotonic() - self._last_ok > self.lease_ms / 1000:
                    self._lost.set()
                    return


def acquire(client: redis.Redis, keys: Keys, lease_ms: int, replicas: int = 0,
            timeout_ms: int = 0) -> Lease | None:
    """Take the table's lease with a new fencing token, or return None if another holds it.

    With ``replicas`` > 0, wait (``WAIT``, on the connection that took it) until that many
    replicas hold the new token, and everything written before it on that master (a claim
    a previous flusher recorded, a trim it committed): so a failover can neither hand out
    this token again nor bring back a state older than the one this flush starts from.
    Raises ``ReplicationTimeout`` (the lease given up again) if they do not within
    ``timeout_ms``."""
    key_args = {"lease": keys.lease, "fence": keys.fence}
    if replicas <= 0:
        token = ACQUIRE(client, key_args, {"lease_ms": lease_ms})
    else:
        [token], acked = replicated(
            client, keys.lease, replicas, timeout_ms,
            lambda pipe: ACQUIRE.queue(pipe, key_args, {"lease_ms": lease_ms}))
        if token is not None and acked < replicas:
            RELEASE(client, {"lease": keys.lease}, {"token": token})
            check_acked(acked, replicas, timeout_ms,
                        f"table {keys.table!r}: the lease of a flush")
    if token is None:
        return None
    return Lease(client, keys, int(token), lease_ms)
