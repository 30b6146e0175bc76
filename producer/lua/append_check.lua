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
-- Errors (the entry is taken out again all the same):
--   BADARGS   wrong number of KEYS or ARGV, or a count that is not a decimal integer
--   BADSCHEMA `schema` would become the table's schema but is not a canonical schema
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
-- Why `schema` cannot be a table's schema (docs/spec.md, "Canonical schema"), or nil: a
-- schema no flusher can read would stop the table's flushes, so it never gets stored.
local SIMPLE = {}
for f in string.gmatch('n b c C s S i I l L e f g z Z u U tdD tdm tts ttm ttu ttn ' ..
                       'tDs tDm tDu tDn', '%S+') do SIMPLE[f] = true end
local DECIMAL_DIGITS = {['32'] = 9, ['64'] = 18, [''] = 38, ['256'] = 76}
local function width(text)
  return text and string.match(text, '^[1-9]%d*$') and tonumber(text) <= 2147483647
end
local function bad_type(fmt, children)
  local n = #children
  if SIMPLE[fmt] or string.match(fmt, '^ts[smun]:') or width(string.match(fmt, '^w:(.*)$'))
  then
    if n == 0 then return nil end
    return fmt .. ' takes no children'
  end
  local p, s, w = string.match(fmt, '^d:([1-9]%d*),(%-?%d+)(.*)$')
  if p then
    local most = DECIMAL_DIGITS[w == '' and '' or string.match(w, '^,(%d+)$') or 'x']
    local scale = s == '0' or string.match(s, '^%-?[1-9]%d*$')
    if most and tonumber(p) <= most and scale and n == 0 then return nil end
    return 'bad decimal ' .. fmt
  end
  if fmt == '+l' or fmt == '+L' or width(string.match(fmt, '^%+w:(.*)$')) then
    if n == 1 then return nil end
    return fmt .. ' takes one child'
  end
  if fmt == '+s' then return nil end
  if fmt == '+m' then
    local e = children[1]
    if n == 1 and e.type == '+s' and type(e.children) == 'table' and #e.children == 2 then
      return nil
    end
    return '+m takes one +s child of two children'
  end
  return 'unknown type ' .. fmt
end
local function bad_fields(fields)
  if type(fields) ~= 'table' then return 'fields are not an array' end
  local keys = 0
  for _ in pairs(fields) do keys = keys + 1 end
  if keys ~= #fields then return 'fields are not an array' end
  local seen = {}
  for _, f in ipairs(fields) do
    if type(f) ~= 'table' or type(f.name) ~= 'string' or type(f.type) ~= 'string'
        or type(f.nullable) ~= 'boolean' or type(f.children) ~= 'table' then
      return 'a field needs children, name, nullable and type'
    end
    if seen[f.name] then return 'two fields named ' .. f.name end
    seen[f.name] = true
    local problem = bad_fields(f.children) or bad_type(f.type, f.children)
    if problem then return problem end
  end
end
local function bad_schema(text)
  if string.sub(text, 1, 1) ~= '[' then return 'not a JSON array' end
  local ok, fields = pcall(cjson.decode, text)
  if not ok then return 'not JSON' end
  if #fields == 0 then return 'no fields' end
  return bad_fields(fields)
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
if current ~= ARGV[1] then
  local problem = bad_schema(ARGV[1])
  if problem then
    redis.call('XDEL', KEYS[2], id)
    return redis.error_reply('BADSCHEMA ' .. problem .. ' (docs/spec.md); nothing was appended')
  end
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
