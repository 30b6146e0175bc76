"""How one batch is appended: a transaction of XADD and a checking script.

The payload goes to the stream with a plain ``XADD``, never through Lua: passing a payload
through a script makes Redis copy it twice more and cost about two thirds of the append
throughput (measured in docs/performance.md). So each batch is one ``MULTI``:

    MULTI
    SADD  {prefix}:tables <table>                     (first append of this process only)
    XADD  {prefix}:{<table>}:delta * arrow <payload> rows <n> batch <batch id>
    EVAL  CHECK_LUA ...                               (checks the append just made)
    EXEC

``CHECK_LUA`` runs right after the ``XADD``, inside the same transaction, so nobody sees
the entry before it is checked. If the append must not stand (a retry of a batch already
appended, a schema conflict, backpressure, Redis out of memory), the script removes the
entry again (``XDEL``) and says why; otherwise it updates the table's schema, counters and
the batch's deduplication key. ``EVAL`` (not ``EVALSHA``) because a script missing from the
cache inside ``MULTI`` would fail only after the ``XADD`` had run.

The script learns the ID of the entry the ``XADD`` made from a consumer group of its own,
``deltaflush:append``, moved to ``$`` (the stream's last ID) and read with ``XINFO
GROUPS``: O(1), where reading the entry back would copy the payload again. The group is
never read from; it only marks a position.
"""

from __future__ import annotations

from typing import Any

from . import wire

#: Consumer group that marks the stream's last ID for ``CHECK_LUA``; never read from.
ID_GROUP = "deltaflush:append"

#: How long a batch ID is remembered, so that a retried append is not added twice.
DEDUP_TTL_S = 120

# KEYS: schema, delta, pending, stats, dedup key of this batch, dead
# ARGV: schema bytes, payload bytes, rows, schema it evolves from ('' if none), max pending
#       bytes (0: no limit), dead-letter ID to delete ('' if none), dedup TTL s, ID group
# returns {OK, entry id, pending bytes} | {CONFLICT, current schema bytes}
#       | {BACKPRESSURE, pending bytes} | {NO_MEMORY, error text}
# (a retried batch that is already in the stream returns OK with its first entry's ID)
CHECK_LUA = """
local function added_id()
  if redis.pcall('XGROUP', 'SETID', KEYS[2], ARGV[8], '$')['err'] then
    if redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[8], '$')['err'] then
      -- out of memory for a new group: read the entry back (copies it, but this is rare)
      return redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1][1]
    end
  end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local name, id
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] end
      if group[i] == 'last-delivered-id' then id = group[i + 1] end
    end
    if name == ARGV[8] then return id end
  end
end
local id = added_id()
local function pending() return tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0') end
local done = redis.call('GET', KEYS[5])
if done then
  redis.call('XDEL', KEYS[2], id)
  return {1, done, pending()}
end
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and (ARGV[4] == '' or current ~= ARGV[4]) then
  redis.call('XDEL', KEYS[2], id)
  return {0, current}
end
local limit = tonumber(ARGV[5])
if limit > 0 and pending() >= limit and redis.call('XLEN', KEYS[2]) > 1 then
  redis.call('XDEL', KEYS[2], id)
  redis.call('HINCRBY', KEYS[4], 'backpressure', 1)
  return {2, tostring(pending())}
end
-- The first write Redis may refuse when it is out of memory; XDEL it never refuses.
local set = redis.pcall('SET', KEYS[5], id, 'EX', ARGV[7])
if set['err'] then
  redis.call('XDEL', KEYS[2], id)
  return {3, set['err']}
end
if current ~= ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('HINCRBY', KEYS[3], 'rows', ARGV[3])
local total = redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[2])
if ARGV[6] ~= '' then redis.call('XDEL', KEYS[6], ARGV[6]) end
return {1, id, total}
"""

#: The script's refusals (1 is accepted).
CONFLICT, BACKPRESSURE, NO_MEMORY = 0, 2, 3


def queue_append(pipe: Any, keys: wire.Keys, payload: Any, rows: int, batch_id: str,
                 schema: bytes, evolves_from: bytes, max_pending_bytes: int,
                 dead_id: str = "") -> None:
    """Queue the ``XADD`` and its check on a transaction ``pipe`` (two replies: the new
    entry's ID and the check's verdict)."""
    pipe.xadd(keys.delta, {wire.FIELD_ARROW: payload, wire.FIELD_ROWS: rows,
                           wire.FIELD_BATCH: batch_id})
    pipe.eval(CHECK_LUA, 6, keys.schema, keys.delta, keys.pending, keys.stats,
              keys.dedup(batch_id), keys.dead,
              schema, len(payload), rows, evolves_from, max_pending_bytes, dead_id,
              DEDUP_TTL_S, ID_GROUP)
