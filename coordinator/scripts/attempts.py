"""How often an action's dispatch failed its agent worker: the count of a poison action
(``poison.py``), kept with the conversation's inbox so it follows the action from node
to node."""

ATTEMPTS = """
-- attempts: how often an action's dispatch failed its agent worker (poison actions).
-- KEYS[1]  conversation attempts hash
-- ARGV[1]  action id   ARGV[2] '': read; else why a dispatch of it failed (counted)
-- ARGV[3]  time to live (ms)
-- returns  {failed dispatches of the action, why the last one failed ('' if none)}
-- One action of a conversation is dispatched at a time: counting a failure of one drops
-- the fields of any other (processed since, or given up), so the hash holds one action.
local n, why = ARGV[1], ARGV[2]
if why == '' then
  local f = redis.call('HMGET', KEYS[1], n, n .. ':why')
  return {tonumber(f[1] or '0'), f[2] or ''}
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if f ~= n and f ~= n .. ':why' then redis.call('HDEL', KEYS[1], f) end
end
local count = redis.call('HINCRBY', KEYS[1], n, 1)
redis.call('HSET', KEYS[1], n .. ':why', why)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {count, why}
"""
