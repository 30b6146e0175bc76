"""Named fault-injection points, for the fault-injection tests.

``DELTAFLUSH_FAILPOINTS`` holds ``name=action`` pairs separated by commas; ``action`` is
``kill`` (SIGKILL this process), ``stop`` (SIGSTOP: freeze until SIGCONT), ``raise`` (raise
:class:`InjectedFault`, an ``OSError`` like a storage error) or ``sleep:SECONDS``.
With ``DELTAFLUSH_FAILPOINT_ONCE_DIR`` set, each ``kill``/``stop``/``raise`` point fires once
across all processes: the first process to reach it writes its pid to a marker file there,
and later ones pass. ``sleep`` fires every time.

Unset (the normal case), :func:`failpoint` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import cache


class InjectedFault(OSError):
    """The error the ``raise`` action raises."""


@cache
def _points() -> dict[str, str]:
    spec = os.environ.get("DELTAFLUSH_FAILPOINTS", "")
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {name.strip(): action.strip() for name, action in pairs}


def failpoint(name: str) -> None:
    action = _points().get(name)
    if action is None:
        return
    if action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
        return
    if not _first_time(name):
        return
    # Signalled to this thread, not to the process: a process-directed signal goes to the
    # main thread, and the thread that sent it may run on (e.g. commit) before it stops.
    if action == "kill":
        signal.pthread_kill(threading.get_ident(), signal.SIGKILL)
    elif action == "stop":
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    elif action == "raise":
        raise InjectedFault(f"injected fault at {name}")


def _first_time(name: str) -> bool:
    once_dir = os.environ.get("DELTAFLUSH_FAILPOINT_ONCE_DIR")
    if not once_dir:
        return True
    try:
        fd = os.open(os.path.join(once_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True
