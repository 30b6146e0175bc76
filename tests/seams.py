"""Fault injection through the flush's seams: wrap a range source or a sink, and run a hook
instead of one of its public methods. No private method is ever patched.

>>> source = Hooked(RedisStream(client, keys), commit=crash)      # step 5 raises
>>> Flusher(client, storage, settings, source=lambda t: source)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from producer import Settings, wire
from producer.errors import LeaseLost
from workers.flusher import Flusher
from workers.sinks.folder import FolderSink
from workers.sources.redis_stream import RedisStream
from workers.storage import Storage


class Hooked:
    """``inner`` with ``hooks[name](real_method, *args, **kwargs)`` run instead of
    ``inner.name(*args, **kwargs)``; every other attribute is ``inner``'s."""

    def __init__(self, inner: Any, **hooks: Callable[..., Any]) -> None:
        self._inner = inner
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        hook = self._hooks.get(name)
        if hook is None:
            return attr
        return lambda *args, **kwargs: hook(attr, *args, **kwargs)


def flusher(client: Any, root: Any, settings: Settings | None = None, *,
            source: dict[str, Callable[..., Any]] | None = None,
            sink: dict[str, Callable[..., Any]] | None = None) -> Flusher:
    """A ``Flusher`` to a folder ``root`` whose range source and folder sink have ``source``
    and ``sink`` hooks."""
    settings = settings or Settings()
    storage = Storage(str(root))

    def make_source(table: str) -> Any:
        return Hooked(RedisStream(client, wire.Keys(settings.key_prefix, table)),
                      **(source or {}))

    return Flusher(client, storage, settings, source=make_source,
                   sink=Hooked(FolderSink(storage, settings.max_file_bytes), **(sink or {})))


class FlushInThread(threading.Thread):
    """``flusher.flush(table)`` in a thread of its own, started at once: for a flusher that a
    hook freezes mid-flush while the test lets its lease run out. After ``join``, ``result``
    is what the flush returned, or ``error`` the ``LeaseLost`` it raised (fenced)."""

    def __init__(self, flusher: Any, table: str) -> None:
        super().__init__()
        self.flusher = flusher
        self.table = table
        self.result: Any = None
        self.error: LeaseLost | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.flusher.flush(self.table)
        except LeaseLost as exc:
            self.error = exc


class CommitTwice:
    """A sink ``commit`` hook that commits each staged range twice, as a retry after a
    commit that landed would, and asserts that the second finds the range held.
    ``first``: what the first commits returned."""

    def __init__(self) -> None:
        self.first: list[Any] = []

    def __call__(self, real: Callable[[Any], Any], staged: Any) -> Any:
        done = real(staged)
        self.first.append(done)
        assert real(staged).already
        return done


def crash(*_: Any, **__: Any) -> Any:
    """A hook that stands for the process dying at that call."""
    raise KeyboardInterrupt("simulated crash")
