-- lease_release: give the lease up if this flusher still holds it.
-- KEYS: lease
-- ARGV: token
-- Returns: 1 if released, 0 if it was not ours (any more).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
