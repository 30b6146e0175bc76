"""The range source of a table's delta: one Redis stream, ``{prefix}:{<table>}:delta``, or
one shard's, ``{prefix}:{<table>~<i>}:delta`` (``wire.Keys``; its ``stream`` names it).

Claims and commits run the scripts ``producer/lua/claim.lua`` and ``commit.lua``, which
check the lease's fencing token in Redis before they change anything (the fence).

Failover (a replica promoted, Redis replicating asynchronously): with ``replicas`` > 0
(``DELTAFLUSH_APPEND_REPLICAS``) the lease and every new claim are on that many replicas
(``WAIT`` on the connection that wrote them) before the flush goes on, so no file is
published for a claim a failover could forget (the next flush would form another range over
the same rows: duplicates), and no token is handed out twice. The commit (trim) is not
waited for: a failover that forgets it brings back the claim it deleted, whose range the
next flush resumes and the sink recognises (idempotent by range), so nothing is duplicated. Reads
fetch ``XRANGE`` chunks of about ``CHUNK_BYTES``, the next one in the background while the
caller decodes and writes this one; the replies are taken as Redis sends them, without
redis-py's tuple and dict per entry (``raw_replies``, ``entries.Chunk.from_reply``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pyarrow as pa
import redis
from redis.client import CaseInsensitiveDict

from producer import scripts, wire
from producer.cluster import check_acked, replicated
from producer.errors import NotAtHead
from workers.lease import acquire
from workers.metrics import duration_fields

from . import Claim, Lease, Range, Tally
from .entries import Chunk
from .reading import EntryReader

#: Target size of one XRANGE chunk.
CHUNK_BYTES = 8 * 1024 * 1024
MAX_CHUNK_ENTRIES = 1024
#: Entries in the first XRANGE chunk, before their size is known.
FIRST_CHUNK_ENTRIES = 2

CLAIM = scripts.load("claim")
COMMIT = scripts.load("commit")
PIN = scripts.load("config_pin")


class RedisStream:
    """A table's delta stream in one Redis (see the module doc)."""

    def __init__(self, client: redis.Redis, keys: wire.Keys, replicas: int = 0,
                 replicas_timeout_ms: int = 2000) -> None:
        self.client = client
        self.keys = keys
        #: replicas that must hold the lease and each claim before the flush goes on
        #: (``DELTAFLUSH_APPEND_REPLICAS``; see the module doc)
        self.replicas = replicas
        self.replicas_timeout_ms = replicas_timeout_ms
        self.table = keys.table
        self.stream = keys.stream
        self._raw = raw_replies(client)

    def __repr__(self) -> str:
        return f"RedisStream({self.keys.delta!r})"

    def lease(self, lease_ms: int) -> Lease | None:
        return acquire(self.client, self.keys, lease_ms, self.replicas,
                       self.replicas_timeout_ms)

    def load_claim(self) -> Claim | None:
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.keys.claim))
        if not raw:
            return None
        return Claim(first=raw[b"first"].decode(), last=raw[b"last"].decode(),
                     count=int(raw[b"count"]), schema=raw.get(b"schema", b""),
                     config=raw.get(b"config", b"").decode())

    def config(self) -> str:
        raw = cast(bytes | None, self.client.get(self.keys.config))
        return raw.decode() if raw else ""

    def pin_config(self, expected: str, pinned: str) -> str:
        current = PIN(self.client, {"config": self.keys.config},
                      {"expected": expected, "pinned": pinned})
        return current.decode() if isinstance(current, bytes) else str(current)

    def read(self, start: Claim | str | None, max_bytes: int) -> EntryReader:
        if isinstance(start, Claim):
            self._check_head(start)
            chunks = self._chunks(start.first, start.last)
            schema = wire.stored_schema(start.schema) if start.schema else None
            return EntryReader(self.table, self.stream, chunks, start, schema, start.config,
                               max_bytes, lambda _: None, chunks.close)
        chunks = self._chunks("-" if start is None else "(" + start, "+")
        # The table's schema (shard 0's, the authority of every shard's copy: a shard's
        # entries have it or an older one), so each file has the table's latest columns
        # whichever shard wrote it; and its configuration (shard 0's slot, both).
        stored, config = cast(list[bytes | None],
                              self.client.mget(self.keys.authority, self.keys.config))
        schema = wire.stored_schema(stored) if stored else None
        return EntryReader(self.table, self.stream, chunks, None, schema,
                           config.decode() if config else "", max_bytes, self._evolved,
                           chunks.close)

    def _check_head(self, claim: Claim) -> None:
        """A claim must start at the head of the stream (the commit checks it too): refuse
        before anything of it is written, not after its files are published."""
        head = cast(list[wire.Entry], self.client.xrange(self.keys.delta, count=1))
        if head and head[0][0].decode() != claim.first:
            raise NotAtHead(f"table {self.table!r}: NOTHEAD the delta starts at "
                            f"{head[0][0].decode()}, before the claimed range "
                            f"{claim.first}..{claim.last}")

    def _evolved(self, schema: pa.Schema | None) -> pa.Schema | None:
        """The table's schema if it is no longer ``schema`` (it evolved during the read)."""
        stored = cast(bytes | None, self.client.get(self.keys.authority))
        if not stored:
            return None
        current = wire.stored_schema(stored)
        return None if schema is not None and current.equals(schema) else current

    def _chunks(self, first: str, last: str) -> Generator[Chunk, None, None]:
        """Entries ``first..last`` (inclusive) in chunks of about ``CHUNK_BYTES``; the next
        chunk is fetched in the background while the caller works on this one."""
        with ThreadPoolExecutor(1, thread_name_prefix="xrange") as pool:
            count = FIRST_CHUNK_ENTRIES
            pending = pool.submit(self._fetch, first, last, count)
            while True:
                chunk = pending.result()
                if not len(chunk):
                    return
                full = len(chunk) >= count
                if full:
                    size = sum(map(len, filter(None, chunk.payloads)))
                    average = max(1, size // len(chunk))
                    # at most 4x the last count: a few small entries at the head must not
                    # make the next chunk a thousand large ones
                    count = max(1, min(MAX_CHUNK_ENTRIES, CHUNK_BYTES // average, 4 * count))
                    pending = pool.submit(self._fetch, "(" + chunk.id(len(chunk) - 1), last,
                                          count)
                yield chunk
                if not full:
                    return

    def _fetch(self, first: str, last: str, count: int) -> Chunk:
        """One XRANGE, without redis-py's conversion of each entry (``entries``) where the
        client allows it (a ``redis.Redis``; a Redis Cluster client converts)."""
        if self._raw is not None:
            return Chunk.from_reply(cast(list[list[object]], self._raw.xrange(
                self.keys.delta, first, last, count=count)))
        return Chunk.from_entries([(entry_id.decode(), fields) for entry_id, fields in cast(
            list[wire.Entry], self.client.xrange(self.keys.delta, first, last, count=count))])

    def record_claim(self, lease: Lease, rng: Range) -> None:
        keys = {"lease": self.keys.lease, "claim": self.keys.claim}
        args = {"token": lease.token, "first": rng.first, "last": rng.last,
                "count": rng.count, "schema": rng.schema, "config": rng.config}
        if self.replicas <= 0:
            CLAIM(self.client, keys, args, table=self.table)
            return
        try:  # the claim on the replicas before any file of it is published
            _, acked = replicated(self.client, self.keys.claim, self.replicas,
                                  self.replicas_timeout_ms,
                                  lambda pipe: CLAIM.queue(pipe, keys, args))
        except redis.ResponseError as exc:
            raise scripts.script_error(exc, self.table) from exc
        check_acked(acked, self.replicas, self.replicas_timeout_ms,
                    f"table {self.table!r}: the claim of range {rng.first}..{rng.last}")

    def commit(self, lease: Lease, rng: Range, tally: Tally) -> int:
        k = self.keys
        return int(COMMIT(
            self.client,
            {"lease": k.lease, "claim": k.claim, "delta": k.delta, "dead": k.dead,
             "pending": k.pending, "stats": k.stats},
            {"token": lease.token, "first": rng.first, "last": rng.last,
             "next_id": wire.next_id(rng.last), "rows": tally.rows,
             "arrow_bytes": tally.arrow_bytes, "files": tally.files,
             "file_bytes": tally.file_bytes, "pending_rows_change": -rng.pending_rows,
             "pending_bytes_change": -rng.pending_bytes, "now_ms": int(time.time() * 1000),
             "seconds": round(tally.seconds, 6),
             "buckets": " ".join(duration_fields(tally.seconds))},
            tail=[x for entry_id, error in rng.dead for x in (entry_id, error)],
            table=self.table))

    def pending(self) -> bool:
        return bool(self.client.xlen(self.keys.delta))

    def stuck(self) -> str | None:
        reason = cast(bytes | None, self.client.hget(self.keys.stuck, "reason"))
        return reason.decode(errors="replace") if reason is not None else None

    def mark_stuck(self, reason: str) -> None:
        self.client.hset(self.keys.stuck, mapping={
            "reason": reason, "since_ms": int(time.time() * 1000)})


def raw_replies(client: redis.Redis) -> redis.Redis | None:
    """``client`` sharing its connections, but with XRANGE replies left as Redis sends them
    (``entries.Chunk.from_reply``); None for a client of another kind (Redis Cluster)."""
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None  # a single-connection client's copy would release its connection
    raw = copy.copy(client)
    raw.auto_close_connection_pool = False  # the pool is the client's: not closed with the copy
    raw.response_callbacks = CaseInsensitiveDict(client.response_callbacks)
    raw.set_response_callback("XRANGE", _as_sent)
    return raw


def _as_sent(response: object, **options: object) -> object:
    return response
