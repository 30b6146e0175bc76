-- due: decide whether a table gets a flush_table now, and if so mark it queued.
-- Shared by beat's scheduling rounds and the producer's size trigger (producer/due.py).
-- KEYS: queued lease delta claim sched stuck
-- ARGV: queued_ttl_ms default_interval_ms force
-- Returns: 1 if the table is due (and is now marked queued for queued_ttl_ms), else 0.
--   Not due: a flush is queued or running, the table is stuck, nothing is pending, or
--   (unless force is '1') its flush interval has not passed since it was last scheduled.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
if redis.call('XLEN', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '1' then
  local interval = tonumber(redis.call('HGET', KEYS[5], 'interval_ms') or ARGV[2])
  local last = tonumber(redis.call('HGET', KEYS[5], 'last_ms') or '0')
  if now - last < interval then return 0 end
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('HSET', KEYS[5], 'last_ms', now)
return 1
