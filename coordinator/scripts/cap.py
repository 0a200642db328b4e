"""The caps on running conversations: a user's slots, an organisation's places."""

from __future__ import annotations

ADMIT = """
-- admit: claim one of the user's max_concurrent_conversations slots.
-- KEYS[1]  user's claims sorted set (sid -> recency, never more than cap members)
-- KEYS[2]  user's loops hash (sid -> 'live:INC' | 'stopping:INC'; at most cap entries)
-- KEYS[3]  user's organisation string
-- KEYS[4]  user's connections hash (connection id -> sid, on every node)
-- ARGV[1]  sid   ARGV[2] node incarnation   ARGV[3] cap
-- ARGV[4]  'new' (a start: the sid becomes the most recent claim) | 'retry' (still waiting)
-- ARGV[5]  recency score (ms) of a new claim; kept above every other claim
-- ARGV[6]  policy when a new claim finds the cap full: 'evict' | 'reject'
-- ARGV[7]  the user's organisation to record ('' = keep the recorded one), kept for
--          30 days after the user's last start that names it
-- ARGV[8]  for a start a joining connection asked for: the user's connection cap ('0' =
--          none); a user who holds that many already is refused before any eviction
-- returns  {status, claims, org, evicted sid, its incarnation, evicted sid, ...}
--   status: 'go' (slot held: start the loop) | 'wait' (evicted loops still stopping)
--           'evicted' (more recent conversations took every slot)
--           'rejected' (policy reject and the cap full: nothing changed)
--           'connections' (the joining connection is over the connection cap: nothing
--           changed; claims is then the user's connections)
--   claims: the user's claims now; org: the user's organisation ('' = none)
-- A loop may only run while its sid has an entry in loops, and an entry is only removed
-- after its loop stopped, so HLEN(loops) <= cap bounds the loops actually running.

local sid, node, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'PX', 2592000000) end
local org = redis.call('GET', KEYS[3]) or ''
local conns = tonumber(ARGV[8])
if ARGV[4] == 'new' and conns > 0 and redis.call('HLEN', KEYS[4]) >= conns then
  return {'connections', redis.call('HLEN', KEYS[4]), org}
end
if ARGV[4] == 'new' and ARGV[6] == 'reject' and not redis.call('ZSCORE', KEYS[1], sid)
   and redis.call('ZCARD', KEYS[1]) >= cap then
  return {'rejected', redis.call('ZCARD', KEYS[1]), org}
end
local out = {}
if ARGV[4] == 'new' then
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local score = tonumber(ARGV[5])
  if top[2] and tonumber(top[2]) >= score then score = tonumber(top[2]) + 1 end
  redis.call('ZADD', KEYS[1], score, sid)
  while redis.call('ZCARD', KEYS[1]) > cap do
    local victim = redis.call('ZPOPMIN', KEYS[1])[1]
    local held = redis.call('HGET', KEYS[2], victim)
    if held and string.sub(held, 1, 5) == 'live:' then
      local vnode = string.sub(held, 6)
      redis.call('HSET', KEYS[2], victim, 'stopping:' .. vnode)
      out[#out + 1] = victim
      out[#out + 1] = vnode
    end
  end
end
local claims = redis.call('ZCARD', KEYS[1])
if not redis.call('ZSCORE', KEYS[1], sid) then
  table.insert(out, 1, org)
  table.insert(out, 1, claims)
  table.insert(out, 1, 'evicted')
  return out
end
if redis.call('HEXISTS', KEYS[2], sid) == 1 or redis.call('HLEN', KEYS[2]) < cap then
  redis.call('HSET', KEYS[2], sid, 'live:' .. node)
  table.insert(out, 1, org)
  table.insert(out, 1, claims)
  table.insert(out, 1, 'go')
  return out
end
-- still full: report every stopping loop (the new victims among them) so the caller can
-- nudge their owners
out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if string.sub(all[i + 1], 1, 9) == 'stopping:' then
    out[#out + 1] = all[i]
    out[#out + 1] = string.sub(all[i + 1], 10)
  end
end
table.insert(out, 1, org)
table.insert(out, 1, claims)
table.insert(out, 1, 'wait')
return out
"""

ORG_ADMIT = """
-- org_admit: take one of an organisation's places for a loop whose user slot is held.
-- KEYS[1]  organisation's loops hash (sid -> 'USER INC:EPOCH' of the start holding it)
-- ARGV[1]  sid   ARGV[2] holder ('USER INC:EPOCH')   ARGV[3] cap
-- returns  {1, places taken} when held (again), else {0, places taken, sid, holder, ...}:
--          every entry, for the caller to find the stale ones (org_prune)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
   or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return {1, redis.call('HLEN', KEYS[1])}
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, redis.call('HLEN', KEYS[1]))
table.insert(out, 1, 0)
return out
"""

ORG_PRUNE = """
-- org_prune: drop organisation places whose loop no longer holds its user's slot.
-- KEYS[1]  organisation's loops hash
-- ARGV     sid, holder, sid, holder, ...: entries the caller found stale; each is dropped
--          only while it still names that holder (a new start of the sid rewrites it)
-- returns  the number dropped
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""

RELEASE_SLOT = """
-- release_slot: free a cap slot after the loop stopped, or drop a claim that never ran.
-- KEYS[1]  user's claims sorted set   KEYS[2] user's loops hash
-- ARGV[1]  sid   ARGV[2] incarnation that ran (or was starting) the loop
-- returns  1 when a slot was freed, 0 otherwise
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held == 'live:' .. ARGV[2] or held == 'stopping:' .. ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
if not held then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""
