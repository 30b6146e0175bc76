-- claim: record the range a flusher is writing (step 3 of the flush protocol, workers/flusher.py).
-- KEYS: lease claim
-- ARGV: token first last count schema config
-- Returns: 1
-- Errors: FENCED the lease is not held by `token` any more
--         CLAIMED a claim exists already (only one range may be claimed at a time)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('CLAIMED a claim exists already') end
redis.call('HSET', KEYS[2], 'first', ARGV[2], 'last', ARGV[3], 'count', ARGV[4],
           'schema', ARGV[5], 'config', ARGV[6], 'token', ARGV[1])
return 1
