-- config_pin: set a table's configuration to `pinned` if it is still `expected` (a
-- compare-and-set; '' stands for no configuration). Used to pin a table's format at its
-- first flush.
-- KEYS: config
-- ARGV: expected pinned
-- Returns: the configuration in force afterwards ('' if none)
local current = redis.call('GET', KEYS[1]) or ''
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return current
