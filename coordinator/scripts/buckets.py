"""A token bucket in Redis, for the limits that hold per user across nodes
(``ratelimit.py``, ``state/limits.py``); ``now`` is defined before it from Redis TIME
(``scripts.ALL``)."""

TAKE_TOKENS = """
-- take_tokens: take up to ARGV[3] tokens from a token bucket refilled continuously.
-- KEYS[1]  bucket hash (tokens, at = ms of the last refill); a missing bucket is full
-- ARGV[1]  rate (tokens per second, > 0)   ARGV[2] burst (most tokens saved up)
-- ARGV[3]  tokens wanted (>= 1)
-- returns  {granted, ms until one more token}: granted 1..ARGV[3] (the wait is 0), or 0
--          and the wait
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(f[1] or burst), tonumber(f[2] or now)
if now > at then tokens = math.min(burst, tokens + (now - at) * rate / 1000) end
local granted = math.min(want, math.floor(tokens))
if granted < 1 then
  return {0, math.ceil((1 - tokens) * 1000 / rate)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - granted), 'at', math.max(now, at))
-- a bucket left alone refills in burst / rate seconds: then it is as good as missing
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {granted, 0}
"""
