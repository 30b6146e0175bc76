"""Whether a table gets a ``flush_table`` now: one script shared by beat's scheduling rounds
and the producer's size trigger, so both deduplicate the same way.

A table is due when it has something pending (entries in its delta, or a claim left by a
crashed flusher), no flush of it is queued (``{T}:queued``) and none is running
(``{T}:lease``), it is not stuck (``{T}:stuck``), and, for a scheduled round, its flush
interval has passed since it was last scheduled (``{T}:sched``: ``interval_ms`` set by the
table's configuration, else the global default; ``last_ms``). A size-triggered request
skips the interval, and so does a flush requested through Redis alone: the field
``flush_requested`` of ``{T}:sched``, which a producer in any language sets with one ``HSET``
(docs/spec.md, "Requesting a flush") and the script clears once a flush that sees what was
appended before it is queued. The script then sets ``{T}:queued`` for a lease period, so a
lost message delays the table by at most that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import scripts, wire

#: The script (``producer/lua/due.lua``).
DUE = scripts.load("due")


def due_keys(keys: wire.Keys) -> dict[str, str]:
    return {"queued": keys.queued, "lease": keys.lease, "delta": keys.delta,
            "claim": keys.claim, "sched": keys.sched, "stuck": keys.stuck}


def due_args(queued_ttl_ms: int, interval_ms: int, force: bool) -> dict[str, object]:
    return {"queued_ttl_ms": queued_ttl_ms, "default_interval_ms": interval_ms,
            "force": 1 if force else 0}


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


def celery_app(broker_url: str) -> Any:
    """The Celery app a producer sends ``flush_table`` with (JSON only; made on first use,
    so a producer that never asks for a flush never connects to the broker)."""
    from celery import Celery

    app = Celery("deltaflush-producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    return app
