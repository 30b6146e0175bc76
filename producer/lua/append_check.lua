-- append_check: check the XADD just made in the same MULTI, and undo it (XDEL) if it must
-- not stand. See docs/protocol.md, "Appending".
-- KEYS: schema delta pending stats dedup dead
-- ARGV: schema payload_bytes rows evolves_from max_pending_bytes dead_id dedup_ttl_s id_group
-- Returns: {1, entry id, pending bytes} accepted (a retried batch ID: the first entry's ID)
--          {0, current schema} CONFLICT: the table's schema is neither `schema` nor `evolves_from`
--          {2, pending bytes} BACKPRESSURE: over max_pending_bytes
--          {3, error text} NO_MEMORY: Redis refused a write for lack of memory
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
