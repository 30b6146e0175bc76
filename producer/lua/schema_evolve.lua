-- schema_evolve: move a sharded table's schema (shard 0's `schema`, the authority of every
-- shard's copy) from `expected` to `schema`, a compare-and-set. Deltaflush protocol 2: a
-- producer runs it before a batch evolves the copy of a shard i >= 1 (docs/spec.md, 10.2).
-- KEYS: schema protocol
-- ARGV: expected schema protocol
-- Replies:
--   {1, schema}            the authority holds `schema` (it did already, or held `expected`,
--                          '' standing for no schema yet)
--   {0, current}           CONFLICT: it holds neither; shape the batch to `current` again
--   {4, required protocol} PROTOCOL: the table needs a later protocol than `protocol`
-- Errors: BADSCHEMA `schema` is not a JSON array of fields (nothing was changed)
local required = tonumber(redis.call('GET', KEYS[2]) or '1')
if required > tonumber(ARGV[3]) then return {4, required} end
local current = redis.call('GET', KEYS[1]) or ''
if current == ARGV[2] then return {1, current} end
if current ~= ARGV[1] then return {0, current} end
local ok, fields = pcall(cjson.decode, ARGV[2])
if string.sub(ARGV[2], 1, 1) ~= '[' or not ok or type(fields) ~= 'table' or #fields == 0 then
  return redis.error_reply('BADSCHEMA not a canonical schema (docs/spec.md); nothing was changed')
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
