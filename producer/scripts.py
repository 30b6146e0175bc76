"""The Lua scripts of deltaflush: one ``.lua`` file each in ``producer/lua/``, loaded here.

Every file starts with a header that names its arguments, which this module reads::

    -- commit: trim a claimed, published range ...
    -- KEYS: lease claim delta dead pending stats
    -- ARGV: token first last ... now_ms dead...
    -- Returns: ...
    -- Errors: FENCED ...

A trailing ``name...`` in ``ARGV`` is a repeated tail (passed as ``tail=``). Callers pass
keys and arguments by name, never by position. A script refuses with an error reply whose
first word is a code (``FENCED``, ``NOTHEAD``, ...); :func:`script_error` turns it into the
exception class for that code (``producer.errors``), so callers classify errors by type.

The files are the protocol's reference: a producer in another language loads
``append_check.lua`` itself and sends it unchanged (docs/spec.md, "The append transaction").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import redis

from .cluster import REDIRECTS, by_master, on_master
from .errors import ClaimMismatch, DeltaflushError, LeaseLost, NotAtHead

#: The folder of the ``.lua`` files.
FOLDER = Path(__file__).with_name("lua")

#: Error codes the scripts reply with, and the exception each becomes.
ERRORS: dict[str, type[DeltaflushError]] = {
    "FENCED": LeaseLost,
    "CLAIMED": ClaimMismatch,
    "NOCLAIM": ClaimMismatch,
    "NOTHEAD": NotAtHead,
}


@dataclass(frozen=True)
class Script:
    """One script: its source, the names of its KEYS and ARGV, and its SHA1."""

    name: str
    source: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    tail: str | None
    sha: str

    def argv(self, keys: Mapping[str, str], args: Mapping[str, Any],
             tail: Sequence[Any] = ()) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV in the script's order, from names; raises ``TypeError`` on a
        missing or unknown name."""
        for kind, given, wanted in (("KEYS", keys, self.keys), ("ARGV", args, self.args)):
            if set(given) != set(wanted):
                raise TypeError(f"script {self.name}: {kind} must be {list(wanted)}, got "
                                f"{sorted(given)}")
        if tail and self.tail is None:
            raise TypeError(f"script {self.name} takes no repeated ARGV")
        return [keys[k] for k in self.keys], [args[a] for a in self.args] + list(tail)

    def __call__(self, client: Any, keys: Mapping[str, str], args: Mapping[str, Any],
                 tail: Sequence[Any] = (), table: str = "") -> Any:
        """Run the script (``EVALSHA``, loading it on ``NOSCRIPT``); a refusal raises the
        exception of its code (see :data:`ERRORS`), its message naming ``table``."""
        key_list, arg_list = self.argv(keys, args, tail)
        try:
            try:
                return client.evalsha(self.sha, len(key_list), *key_list, *arg_list)
            except redis.exceptions.NoScriptError:
                return client.eval(self.source, len(key_list), *key_list, *arg_list)
        except redis.ResponseError as exc:
            raise script_error(exc, table) from exc

    def run_each(self, client: Any, calls: Sequence[tuple[Mapping[str, str],
                                                          Mapping[str, Any]]]) -> list[Any]:
        """Run the script once for each ``(keys, args)`` of ``calls``, in one pipeline per
        Redis master (a Redis Cluster's masters, by the slot of each call's first key), the
        script loaded at its head (so a promoted replica's empty cache does not matter);
        return the replies in order.

        The masters come from the cluster client's map of slots, which a reshard or a
        failover makes stale: a call whose slot answers a redirect (``MOVED``, ``ASK``,
        ``TRYAGAIN``, ``CLUSTERDOWN``: the script did not run) runs again on its own, on the
        master that serves its slot now (``producer.cluster.on_master``, which re-reads the
        map). Any other error reply raises."""
        replies: list[Any] = [None] * len(calls)
        firsts = [self.argv(keys, args)[0][0] for keys, args in calls]
        redirected: list[int] = []
        for master, positions in by_master(client, firsts):
            pipe = master.pipeline(transaction=False)
            pipe.script_load(self.source)
            for i in positions:
                key_list, arg_list = self.argv(*calls[i])
                pipe.evalsha(self.sha, len(key_list), *key_list, *arg_list)
            loaded, *results = pipe.execute(raise_on_error=False)
            if isinstance(loaded, Exception):
                raise loaded
            for i, reply in zip(positions, results, strict=True):
                if isinstance(reply, REDIRECTS):
                    redirected.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[i] = reply
        for i in redirected:
            keys, args = calls[i]
            replies[i] = on_master(client, firsts[i], partial(self, keys=keys, args=args),
                                   idempotent=False)
        return replies

    def queue(self, pipe: Any, keys: Mapping[str, str], args: Mapping[str, Any],
              tail: Sequence[Any] = ()) -> None:
        """Queue the script on a pipeline or inside ``MULTI`` as ``EVAL`` with its source: a
        script missing from Redis's cache must not fail after the commands before it ran."""
        key_list, arg_list = self.argv(keys, args, tail)
        pipe.eval(self.source, len(key_list), *key_list, *arg_list)


@cache
def load(name: str) -> Script:
    """The script ``producer/lua/<name>.lua``."""
    source = (FOLDER / f"{name}.lua").read_text()
    header = {}
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        label, _, value = line[2:].strip().partition(":")
        if label in ("KEYS", "ARGV"):
            header[label] = value.split()
    args = header.get("ARGV", [])
    tail = args.pop()[:-3] if args and args[-1].endswith("...") else None
    return Script(name, source, tuple(header.get("KEYS", [])), tuple(args), tail,
                  hashlib.sha1(source.encode()).hexdigest())


def script_error(exc: redis.ResponseError, table: str = "") -> Exception:
    """The deltaflush exception for a script's error reply, or ``exc`` itself when its code
    is not one of ours (an out-of-memory error, a Redis error)."""
    text = str(exc)
    cls = ERRORS.get(text.split(" ", 1)[0])
    if cls is None:
        return exc
    return cls(f"table {table!r}: {text}" if table else text)
