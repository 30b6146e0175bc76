"""Drain a table's delta into Parquet, exactly once. Plain code: no Celery here.

The protocol
============
One flush of table ``T`` holds ``T``'s lease (``workers.lease``) and repeats, one file at a
time, until the delta is empty (or its time budget is spent):

1. **Claim.** If ``{T}:claim`` exists, a previous flusher died or was fenced mid-file: resume
   *its* claim, the exact range ``first..last`` of ``count`` entries, with the schema it
   recorded. Otherwise read entries from the head of the delta, in chunks, until their Arrow
   data reaches ``max_file_bytes`` or the delta ends; that range becomes the claim.
2. **Write** the range into a temporary file (not ``*.parquet``, outside the table's folder).
   Entries are decoded and validated one by one; an entry that cannot be decoded or cast to
   the file's schema is set aside for the dead-letter stream instead of failing the flush.
   Reading a claimed range must return exactly ``count`` entries, or the flush stops
   (``ClaimMismatch``): then another flusher committed it meanwhile.
3. **Record the claim** (new claims only), in a script that checks the lease token. From now
   on the range, and so the file's content and name, are fixed.
4. **Publish** the file atomically and durably under a name made from the range:
   ``part-<first id>_<last id>.parquet``.
5. **Commit**, in one script that checks the lease token: move the set-aside entries to
   ``{T}:dead``, ``XTRIM MINID <last id + 1>`` (exact), delete the claim, update counters.

Ranges are pipelined: while one range goes through steps 3-5 (on a committer thread), the
next one is read and encoded, from just after it; no further (so memory stays bounded, and a
stop request ends the flush after at most that one range more), and not at all for a sorted
table, whose files are held whole until written. Steps 3-5 of a range start
only once the range before is committed, so claims and commits still come one at a time, in
order; what runs ahead only reads.

Why each crash is harmless:

* before 3 (which includes a range read ahead): nothing is recorded; the temporary file is
  garbage that the next flush ignores (and ``Storage.sweep_temp`` removes). The next
  flusher starts over from the head.
* between 3 and 5: the claim is resumed; the retry writes the same entries with the same
  schema under the same name, and the atomic replace of an identical file changes nothing.
* after 5: the entries are gone from the delta and the file holds them.

Why a frozen flusher cannot corrupt anything: once it wakes, its lease token is stale.
Steps 3 and 5 check the token in Redis and fail. A publish it had not finished can only
write the rows of the claimed range under the claimed name, i.e. the same file again; and a
read of a range that another flusher committed meanwhile comes back short, which stops it
before it publishes. Rows therefore reach Parquet at least once (nothing is trimmed before
its file is published) and at most once (a range has exactly one file name and is trimmed
exactly once): exactly once.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import pyarrow as pa
import redis

from producer import wire
from producer.convert import conform
from producer.errors import ClaimMismatch, LeaseLost, SchemaConflict
from producer.settings import Settings
from producer.tablecfg import TableConfig
from producer.typepolicy import refusal

from .failpoints import failpoint
from .layout import Layout
from .lease import Lease, acquire
from .metrics import record_duration
from .storage import Storage
from .writer import Encoder, FileSet

log = logging.getLogger(__name__)

#: Arrow bytes per row group: big enough for scans, small enough to bound memory.
ROW_GROUP_BYTES = 64 * 1024 * 1024
#: Target size of one XRANGE chunk.
CHUNK_BYTES = 8 * 1024 * 1024
MAX_CHUNK_ENTRIES = 1024
#: Entries in the first XRANGE chunk, before their size is known.
FIRST_CHUNK_ENTRIES = 2

# KEYS: lease, claim   ARGV: token, first, last, count, schema, table config
CLAIM_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('CLAIMED claim exists') end
redis.call('HSET', KEYS[2], 'first', ARGV[2], 'last', ARGV[3], 'count', ARGV[4],
           'schema', ARGV[5], 'config', ARGV[6], 'token', ARGV[1])
return 1
"""

# KEYS: lease, claim, delta, dead, pending, stats
# ARGV: token, last, next id, rows, arrow bytes, files, file bytes, -pending rows,
#       -pending bytes, now ms, then (dead id, error) pairs
COMMIT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
if redis.call('HGET', KEYS[2], 'last') ~= ARGV[2] then
  return redis.error_reply('NOCLAIM the claim is not the one written')
end
-- The claimed range starts at the head of the delta, or trimming up to its end would
-- remove entries no file holds: refuse (the flush fails loudly) instead of losing them.
local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)[1]
if head and head[1] ~= redis.call('HGET', KEYS[2], 'first') then
  return redis.error_reply('NOTHEAD the delta starts at ' .. head[1] ..
                           ', before the claimed range')
end
local ndead = 0
for i = 11, #ARGV, 2 do
  local e = redis.call('XRANGE', KEYS[3], ARGV[i], ARGV[i])
  if #e == 1 then
    local fields = e[1][2]
    table.insert(fields, 'error')
    table.insert(fields, ARGV[i + 1])
    table.insert(fields, 'entry_id')
    table.insert(fields, ARGV[i])
    redis.call('XADD', KEYS[4], '*', unpack(fields))
    ndead = ndead + 1
  end
end
local trimmed = redis.call('XTRIM', KEYS[3], 'MINID', ARGV[3])
redis.call('DEL', KEYS[2])
for _, f in ipairs({{'rows', ARGV[8]}, {'bytes', ARGV[9]}}) do
  if redis.call('HINCRBY', KEYS[5], f[1], f[2]) < 0 then
    redis.call('HSET', KEYS[5], f[1], 0)
  end
end
redis.call('HINCRBY', KEYS[6], 'files', ARGV[6])
redis.call('HINCRBY', KEYS[6], 'rows', ARGV[4])
redis.call('HINCRBY', KEYS[6], 'arrow_bytes', ARGV[5])
redis.call('HINCRBY', KEYS[6], 'bytes', ARGV[7])
redis.call('HINCRBY', KEYS[6], 'dead', ndead)
redis.call('HSET', KEYS[6], 'last_flush_ms', ARGV[10], 'last_id', ARGV[2])
return trimmed
"""


@dataclass
class Claim:
    first: str
    last: str
    count: int
    schema: bytes
    config: str


@dataclass
class Part:
    """One claimed range, written (or not, if every entry was dead) to a temporary file."""

    first: str
    last: str
    count: int
    schema: bytes
    config: str = ""
    name: str = ""
    #: (temporary path, final path) of each file; empty once published
    files: list[tuple[str, str]] = field(default_factory=list)
    published: int = 0
    rows: int = 0
    arrow_bytes: int = 0
    file_bytes: int = 0
    pending_rows: int = 0
    pending_bytes: int = 0
    dead: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FlushResult:
    """What one flush did; ``as_dict()`` is the task's JSON result, shown by Flower."""

    table: str
    status: str = "ok"  # ok | empty | busy | fenced
    rows: int = 0
    files: int = 0
    bytes: int = 0
    arrow_bytes: int = 0
    dead: int = 0
    first_id: str | None = None
    last_id: str | None = None
    seconds: float = 0.0
    more: bool = False
    paths: list[str] = field(default_factory=list)

    def add(self, part: Part, paths: list[str]) -> None:
        self.rows += part.rows
        self.bytes += part.file_bytes
        self.arrow_bytes += part.arrow_bytes
        self.dead += len(part.dead)
        self.first_id = self.first_id or part.first
        self.last_id = part.last
        self.files += len(paths)
        self.paths.extend(paths)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_name(first: str, last: str) -> str:
    """The deterministic name of the file holding stream entries ``first..last``."""
    (fms, fseq), (lms, lseq) = wire.parse_id(first), wire.parse_id(last)
    return f"part-{fms:013d}-{fseq:06d}_{lms:013d}-{lseq:06d}.parquet"


class Flusher:
    """Flushes tables from one Redis to one storage. One per process; thread-safe."""

    def __init__(self, client: redis.Redis, storage: Storage, settings: Settings) -> None:
        self.redis = client
        self.storage = storage
        self.settings = settings
        self._claim_script = client.register_script(CLAIM_LUA)
        self._commit_script = client.register_script(COMMIT_LUA)

    def flush(self, table: str, budget_s: float | None = None,
              stop: Callable[[], bool] | None = None) -> FlushResult:
        """Drain ``table`` until its delta is empty, ``budget_s`` is spent or ``stop()``
        says so (checked between files, e.g. when the worker shuts down).

        Returns ``status="busy"`` without doing anything if another flusher holds the
        table. Raises ``LeaseLost`` if this flusher was fenced (nothing of its is
        committed then), and storage or Redis errors as they come (nothing is trimmed
        then; the next flush resumes).
        """
        keys = wire.Keys(self.settings.key_prefix, table)
        started = time.monotonic()
        result = FlushResult(table)
        lease = acquire(self.redis, keys, self.settings.lease_ms)
        if lease is None:
            result.status = "busy"
            return result
        # One future per range, for its steps 3-5 (see "Ranges are pipelined" above).
        finishing: list[Future[tuple[Part, list[str]]]] = []
        with lease, Encoder() as encoder, \
                ThreadPoolExecutor(1, thread_name_prefix="flush-commit") as committer:
            failpoint("flush.leased")
            claim = self._load_claim(keys)
            after: str | None = None
            try:
                while True:
                    range_started = time.monotonic()
                    written = self._write(lease, keys, claim, after, encoder,
                                          finishing[-1] if finishing else None)
                    if written is None:
                        break
                    part, files = written
                    finishing.append(committer.submit(
                        self._finish, lease, keys, part, files, claim is None, range_started,
                        finishing[-1] if finishing else None))
                    claim, after = None, part.last
                    if files is not None and files.config.sort_by:
                        finishing[-1].result()  # a sorted file is held whole: none ahead
                    elif len(finishing) > 1:  # one range is read ahead, no more
                        finishing[-2].result()
                    if (budget_s is not None and time.monotonic() - started > budget_s) or (
                            stop is not None and stop()):
                        result.more = True
                        break
            finally:
                for done in finishing:
                    result.add(*done.result())  # the first failure raises
        if result.more:
            result.more = bool(self.redis.xlen(keys.delta))
        if result.first_id is None:
            result.status = "empty"
        result.seconds = round(time.monotonic() - started, 3)
        if result.first_id is not None:
            log.log(  # dead letters at WARNING: the worker's default level shows them
                logging.WARNING if result.dead else logging.INFO,
                "flushed table=%s rows=%d files=%d bytes=%d dead=%d ids=%s..%s seconds=%.3f%s",
                table, result.rows, result.files, result.bytes, result.dead,
                result.first_id, result.last_id, result.seconds,
                f"; {result.dead} entries could not be flushed and are dead letters now: "
                f"deltaflush dead list {table}" if result.dead else "",
            )
        return result

    def _finish(self, lease: Lease, keys: wire.Keys, part: Part, files: FileSet | None,
                new_claim: bool, started: float,
                previous: Future[tuple[Part, list[str]]] | None) -> tuple[Part, list[str]]:
        """Close a written range's files, record its claim, publish and commit it (steps 3
        to 5 of the protocol), once the range before it is committed."""
        try:
            if previous is not None:
                previous.result()  # raises if the range before failed: then stop here too
            if files is not None:
                for folder, temp, size, _rows in files.close({
                    "deltaflush.table": keys.table,
                    "deltaflush.first_id": part.first,
                    "deltaflush.last_id": part.last,
                    "deltaflush.entries": str(part.count),
                }):
                    final = self.storage.final_path(keys.table,
                                                    posixpath.join(folder, part.name))
                    part.files.append((temp, final))
                    part.file_bytes += size
                files = None
            failpoint("flush.written")
            if new_claim:
                self._record_claim(lease, keys, part)
                failpoint("flush.claimed")
            lease.check()
            paths = []
            while part.files:
                temp, final = part.files[0]
                self.storage.publish(temp, final)
                part.files.pop(0)
                part.published += 1
                paths.append(self.storage.display(final))
                failpoint("flush.published")
        finally:
            for temp in files.abort() if files is not None else []:
                self.storage.discard(temp)
            for temp, _ in part.files:
                self.storage.discard(temp)
        self._commit(lease, keys, part)
        failpoint("flush.committed")
        try:
            record_duration(self.redis, keys, time.monotonic() - started)
        except redis.RedisError as exc:  # a metric is not worth failing a committed flush
            log.warning("could not record the flush duration of %s: %s", keys.table, exc)
        return part, paths

    # --- steps ------------------------------------------------------------------------

    def _load_claim(self, keys: wire.Keys) -> Claim | None:
        raw = cast(dict[bytes, bytes], self.redis.hgetall(keys.claim))
        if not raw:
            return None
        return Claim(
            first=raw[b"first"].decode(),
            last=raw[b"last"].decode(),
            count=int(raw[b"count"]),
            schema=raw.get(b"schema", b""),
            config=raw.get(b"config", b"").decode(),
        )

    def _entries(
        self, keys: wire.Keys, first: str, last: str
    ) -> Generator[tuple[str, dict[bytes, bytes]], None, None]:
        """Entries ``first..last`` (inclusive) in chunks of about ``CHUNK_BYTES``; the next
        chunk is fetched in the background while the caller decodes and encodes this one."""
        with ThreadPoolExecutor(1, thread_name_prefix="xrange") as pool:
            count = FIRST_CHUNK_ENTRIES
            pending = pool.submit(self.redis.xrange, keys.delta, first, last, count=count)
            while True:
                chunk = cast(list[wire.Entry], pending.result())
                if not chunk:
                    return
                full = len(chunk) >= count
                if full:
                    size = sum(len(fields.get(wire.FIELD_ARROW, b"")) for _, fields in chunk)
                    average = max(1, size // len(chunk))
                    # at most 4x the last count: a few small entries at the head must not
                    # make the next chunk a thousand large ones
                    count = max(1, min(MAX_CHUNK_ENTRIES, CHUNK_BYTES // average, 4 * count))
                    pending = pool.submit(self.redis.xrange, keys.delta,
                                          "(" + chunk[-1][0].decode(), last, count=count)
                for entry_id, fields in chunk:
                    yield entry_id.decode(), fields
                if not full:
                    return

    def _write(self, lease: Lease, keys: wire.Keys, claim: Claim | None, after: str | None,
               encoder: Encoder, before: Future[Any] | None = None
               ) -> tuple[Part, FileSet | None] | None:
        """Read a claimed range, or a new one from the head (or from just ``after`` the
        range before, still being committed: ``before``, whose failure stops this read),
        into temporary files (one per partition folder it touches), encoded on
        ``encoder``; the files are closed by ``_finish``."""
        table = keys.table
        if claim is not None:
            entries = self._entries(keys, claim.first, claim.last)
            schema = wire.deserialize_schema(claim.schema) if claim.schema else None
            config_json = claim.config
        else:
            entries = self._entries(keys, "-" if after is None else "(" + after, "+")
            stored, raw_config = cast(list[bytes | None],
                                      self.redis.mget(keys.schema, keys.config))
            schema = wire.deserialize_schema(stored) if stored else None
            config_json = raw_config.decode() if raw_config else ""
        config = TableConfig.from_json(config_json)
        part: Part | None = None
        files: FileSet | None = None
        try:
            for entry_id, fields in entries:
                failed = before.exception() if before is not None and before.done() else None
                if failed is not None:
                    raise failed
                payload = fields.get(wire.FIELD_ARROW)
                batch: pa.Table | None = None
                error: str | None = None
                try:
                    batch = _decode(payload, schema, table, config.spark_compatible)
                except ValueError as exc:
                    error = str(exc)
                    newer = self._evolved_schema(keys, schema) if claim is None else None
                    if newer is not None:
                        try:
                            candidate = _decode(payload, newer, table,
                                                config.spark_compatible)
                        except ValueError:
                            pass
                        else:
                            if files is not None:
                                break  # the table's schema moved on: end this range here
                            schema, batch, error = newer, candidate, None
                if part is None:
                    part = Part(first=entry_id, last=entry_id, count=0, schema=b"",
                                config=config_json)
                part.last = entry_id
                part.count += 1
                if wire.FIELD_ROWS in fields and payload is not None:
                    part.pending_rows += int(fields[wire.FIELD_ROWS] or 0)
                    part.pending_bytes += len(payload)
                if batch is None:
                    part.dead.append((entry_id, error or "undecodable"))
                    continue
                if schema is None:
                    schema = batch.schema
                if files is None:
                    files = self._files(table, part.first, lease.token, config, schema,
                                        encoder, ahead=after is not None)
                files.write(batch)
                if part.count == 1:
                    failpoint("flush.first_chunk")
                if claim is None and files.arrow_bytes >= self.settings.max_file_bytes:
                    break
            if part is None:
                if claim is not None:
                    raise ClaimMismatch(f"claimed range {claim.first}..{claim.last} of "
                                        f"{table!r} is gone from the delta")
                return None
            if claim is not None and part.count != claim.count:
                raise ClaimMismatch(
                    f"read {part.count} of the {claim.count} claimed entries of {table!r}"
                )
            part.schema = wire.serialize_schema(schema) if schema is not None else b""
            part.name = file_name(part.first, part.last)
            if files is not None:
                part.rows, part.arrow_bytes = files.rows, files.arrow_bytes
                files.seal()
            return part, files
        except BaseException:
            for temp in files.abort() if files is not None else []:
                self.storage.discard(temp)
            raise
        finally:
            entries.close()  # stops its read-ahead thread now, not when collected

    def _files(self, table: str, first: str, token: int, config: TableConfig,
               schema: pa.Schema, encoder: Encoder, ahead: bool) -> FileSet:
        counter = iter(range(1 << 30))

        def open_temp(folder: str) -> tuple[str, pa.NativeFile]:
            temp = self.storage.temp_path(table, f"part-{first}-{next(counter)}", token)
            return temp, self.storage.open_temp(temp)

        return FileSet(Layout(config, schema), open_temp,
                       min(ROW_GROUP_BYTES, self.settings.max_file_bytes), config, encoder,
                       ahead)

    def _evolved_schema(self, keys: wire.Keys, schema: pa.Schema | None) -> pa.Schema | None:
        """The table's schema if it is no longer ``schema`` (it evolved during this flush)."""
        stored = cast(bytes | None, self.redis.get(keys.schema))
        if not stored:
            return None
        current = wire.deserialize_schema(stored)
        return None if schema is not None and current.equals(schema) else current

    def _record_claim(self, lease: Lease, keys: wire.Keys, part: Part) -> None:
        lease.check()
        try:
            self._claim_script(
                keys=[keys.lease, keys.claim],
                args=[lease.token, part.first, part.last, part.count, part.schema,
                      part.config],
            )
        except redis.ResponseError as exc:
            raise _fenced(exc, keys) from exc

    def _commit(self, lease: Lease, keys: wire.Keys, part: Part) -> None:
        args: list[Any] = [
            lease.token, part.last, wire.next_id(part.last), part.rows, part.arrow_bytes,
            part.published, part.file_bytes, -part.pending_rows,
            -part.pending_bytes, int(time.time() * 1000),
        ]
        for entry_id, error in part.dead:
            args += [entry_id, error]
        try:
            trimmed = self._commit_script(
                keys=[keys.lease, keys.claim, keys.delta, keys.dead, keys.pending, keys.stats],
                args=args,
            )
        except redis.ResponseError as exc:
            raise _fenced(exc, keys) from exc
        if trimmed != part.count:
            log.error("table %s: commit trimmed %s entries, claim had %d",
                      keys.table, trimmed, part.count)


def _decode(payload: bytes | None, schema: pa.Schema | None, table: str,
            spark_compatible: bool = True) -> pa.Table:
    if payload is None:
        raise ValueError(f"entry has no {wire.FIELD_ARROW.decode()!r} field")
    batch = wire.decode_payload(payload)
    if batch.schema.metadata:
        batch = batch.replace_schema_metadata(None)
    if schema is not None and not batch.schema.equals(schema):
        try:
            batch = conform(batch, schema, table)
        except SchemaConflict as exc:
            raise ValueError(str(exc)) from exc
        except (pa.ArrowException, TypeError) as exc:
            raise ValueError(f"cannot cast to the table's schema: {exc}") from exc
    refused = refusal(batch.schema, spark_compatible, table)  # a dead letter, not a file
    if refused is not None:
        raise refused
    return batch


def _fenced(exc: redis.ResponseError, keys: wire.Keys) -> Exception:
    text = str(exc)
    if "FENCED" in text:
        return LeaseLost(f"lease on table {keys.table!r} lost before the commit: {text}")
    return ClaimMismatch(f"table {keys.table!r}: {text}")
