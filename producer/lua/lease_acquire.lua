-- lease_acquire: take a table's lease with a fresh fencing token (workers/lease.py).
-- KEYS: lease fence
-- ARGV: lease_ms
-- Returns: the new token (tokens only grow: INCR of `fence`), or nil if the lease is held.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
