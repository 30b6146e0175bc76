-- lease_renew: extend the lease if this flusher still holds it.
-- KEYS: lease
-- ARGV: token lease_ms
-- Returns: 1 if renewed, 0 if the lease is gone or held by another token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
