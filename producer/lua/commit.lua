-- commit: trim a claimed, published range from the delta and move its dead letters, in one
-- step (step 5 of the flush protocol, workers/flusher.py).
-- KEYS: lease claim delta dead pending stats
-- ARGV: token first last next_id rows arrow_bytes files file_bytes pending_rows_change pending_bytes_change now_ms seconds buckets dead...
--   dead: (entry id, error text) pairs of the range's entries that go to the dead letters
--   pending_*_change: what the range adds to the `pending` counters (<= 0; floored at 0)
--   seconds, buckets: the range's flush duration and the space-separated histogram bucket
--   fields of `stats` it falls in (workers/metrics.py)
-- Returns: the number of entries trimmed (the claim's count)
-- Errors: FENCED the lease is not held by `token` any more
--         NOCLAIM the claim is not the range `first`..`last`
--         NOTHEAD the delta's head is not `first`: trimming would remove entries no file holds
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
if redis.call('HGET', KEYS[2], 'last') ~= ARGV[3] or redis.call('HGET', KEYS[2], 'first') ~= ARGV[2] then
  return redis.error_reply('NOCLAIM the claim is not the range ' .. ARGV[2] .. '..' .. ARGV[3])
end
local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)[1]
if head and head[1] ~= ARGV[2] then
  return redis.error_reply('NOTHEAD the delta starts at ' .. head[1] ..
                           ', before the claimed range ' .. ARGV[2] .. '..' .. ARGV[3])
end
local ndead = 0
for i = 14, #ARGV, 2 do
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
local trimmed = redis.call('XTRIM', KEYS[3], 'MINID', ARGV[4])
redis.call('DEL', KEYS[2])
for _, f in ipairs({{'rows', ARGV[9]}, {'bytes', ARGV[10]}}) do
  if redis.call('HINCRBY', KEYS[5], f[1], f[2]) < 0 then
    redis.call('HSET', KEYS[5], f[1], 0)
  end
end
redis.call('HINCRBY', KEYS[6], 'files', ARGV[7])
redis.call('HINCRBY', KEYS[6], 'rows', ARGV[5])
redis.call('HINCRBY', KEYS[6], 'arrow_bytes', ARGV[6])
redis.call('HINCRBY', KEYS[6], 'bytes', ARGV[8])
redis.call('HINCRBY', KEYS[6], 'dead', ndead)
redis.call('HSET', KEYS[6], 'last_flush_ms', ARGV[11], 'last_id', ARGV[3])
for field in string.gmatch(ARGV[13], '%S+') do redis.call('HINCRBY', KEYS[6], field, 1) end
redis.call('HINCRBY', KEYS[6], 'dur_count', 1)
redis.call('HINCRBYFLOAT', KEYS[6], 'dur_sum', ARGV[12])
return trimmed
