-- maintain_due: decide whether a lake table gets a maintain_table now (workers/maintenance.py).
-- KEYS: config maint lock
-- ARGV: default_interval_ms
-- Returns: 1 if the table is due (and `maint`'s last_ms is now set to now), else 0.
--   Not due: not a lake table (the format pinned in `config` is not iceberg or delta), a
--   maintenance run holds `lock`, or its maintenance_interval_s (else default_interval_ms)
--   has not passed since it was last scheduled.
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, config = pcall(cjson.decode, raw)
if not ok or (config['format'] ~= 'iceberg' and config['format'] ~= 'delta') then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local interval = tonumber(ARGV[1])
if type(config['maintenance_interval_s']) == 'number' then
  interval = config['maintenance_interval_s'] * 1000
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[2], 'last_ms') or '0')
if now - last < interval then return 0 end
redis.call('HSET', KEYS[2], 'last_ms', now)
return 1
