-- shards_record: record that a table has `shards` shards, keeping the largest count it ever
-- had (workers flush every shard below it: producer/shards.py).
-- KEYS: sharded
-- ARGV: table shards
-- Returns: the largest shard count of the table, afterwards
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '1')
local wanted = tonumber(ARGV[2])
if wanted > current then
  redis.call('HSET', KEYS[1], ARGV[1], wanted)
  return wanted
end
return current
