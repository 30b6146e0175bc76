-- append_check: check the XADD just made in the same MULTI, and undo it (XDEL) if it must
-- not stand. Deltaflush protocol 1; docs/spec.md, "The append transaction", defines every
-- key, argument and reply. Any producer, in any language, EVALs this very file.
-- KEYS: schema delta pending stats dedup dead protocol
-- ARGV: schema payload_bytes rows evolves_from max_pending_bytes dead_id dedup_ttl_s id_group protocol
-- Replies (an array; the first element is the code):
--   {1, entry id, pending bytes}  ACCEPTED (for a batch ID already appended: the first entry's
--                                 ID, and nothing was added)
--   {0, table's schema}           CONFLICT: the table's schema is neither `schema` nor
--                                 `evolves_from`
--   {2, pending bytes}            BACKPRESSURE: the table's pending bytes are at or over
--                                 max_pending_bytes and the delta holds other entries
--   {3, error text}               NO_MEMORY: Redis refused a write for lack of memory
--   {4, required protocol}        PROTOCOL: the table needs a later protocol than `protocol`
-- Errors: BADARGS wrong number of KEYS or ARGV, or a count that is not a decimal integer
--         (the entry is taken out again all the same)
local function count(i)
  local s = ARGV[i]
  if s and string.match(s, '^%d+$') then return tonumber(s) end
end
if #KEYS ~= 7 or #ARGV ~= 9 or not (count(2) and count(3) and count(5) and count(9))
    or not count(7) or count(7) == 0 then
  -- the entry the XADD before this script made is the stream's last one
  local last = KEYS[2] and redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if last then redis.call('XDEL', KEYS[2], last[1]) end
  return redis.error_reply('BADARGS append_check takes 7 KEYS and 9 ARGV, counts as ' ..
                           'decimal integers (docs/spec.md); nothing was appended')
end
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
local required = tonumber(redis.call('GET', KEYS[7]) or '1')
if required > tonumber(ARGV[9]) then
  redis.call('XDEL', KEYS[2], id)
  return {4, required}
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
  return {2, pending()}
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
