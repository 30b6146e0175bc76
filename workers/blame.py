"""Which setting an error is about, in one line: what ``deltaflush`` prints instead of a
traceback, and what a worker logs when a start-up check fails.

An unreachable Redis, broker or storage is nearly always a wrong setting, so the line names
the variable, its value (passwords hidden) and what failed, e.g.::

    DELTAFLUSH_REDIS_URL=redis://redis:6379/0: cannot reach Redis: Error -2 connecting to
    redis:6379. Name or service not known.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import redis
from kombu.exceptions import OperationalError

from producer.errors import DeltaflushError
from producer.settings import Settings

REDIS, BROKER, STORAGE = "DELTAFLUSH_REDIS_URL", "DELTAFLUSH_BROKER_URL", "DELTAFLUSH_STORAGE_URI"


class SettingFailed(DeltaflushError):
    """Something a setting points at failed: the message names the setting and its value."""

    def __init__(self, variable: str, value: str, what: str, cause: BaseException) -> None:
        self.variable, self.value = variable, value
        super().__init__(f"{describe(variable, value)}: {what}: {flat(cause)}")


def redact(url: str) -> str:
    """``url`` without its password."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url


def describe(variable: str, value: str) -> str:
    """``VAR=value``, or that the default is in use because the variable is not set."""
    if os.environ.get(variable):
        return f"{variable}={redact(value)}"
    if variable == BROKER and os.environ.get(REDIS):
        return f"{variable} (not set: the value of {REDIS}, {redact(value)})"
    return f"{variable} (not set: the default {redact(value)})"


def flat(exc: BaseException) -> str:
    """An exception as one line of text."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def classify(exc: BaseException, settings: Settings) -> SettingFailed | None:
    """The setting ``exc`` is about, judged by its type, or None if it is no such error."""
    if isinstance(exc, SettingFailed):
        return exc
    if isinstance(exc, redis.RedisError):
        return SettingFailed(REDIS, settings.redis_url, "Redis failed", exc)
    if isinstance(exc, OperationalError):
        return SettingFailed(BROKER, settings.broker_url, "the broker failed", exc)
    if isinstance(exc, (OSError, pa.ArrowException)):
        return SettingFailed(STORAGE, settings.storage_uri, "the storage failed", exc)
    return None


@contextlib.contextmanager
def blame(variable: str, value: str, what: str) -> Iterator[None]:
    """Turn any error of the block (but our own) into a ``SettingFailed`` naming
    ``variable``: for code that talks to one service only."""
    try:
        yield
    except DeltaflushError:
        raise
    except Exception as exc:
        raise SettingFailed(variable, value, what, exc) from exc
