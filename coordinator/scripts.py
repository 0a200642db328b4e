"""Lua scripts: every multi-step state change that must be atomic.

Each script touches keys of a single hash tag only (Redis Cluster safe). Times come
from Redis ``TIME`` so that every node orders recency by one clock. Event ids are
per-conversation integers stored as stream entry ids ``<id>-0``; events are published
as the msgpack array ``[id, event]`` built by prefixing 0x92 to the packed id and the
already-packed event.
"""

from __future__ import annotations

from .poison import ATTEMPTS  # failed dispatches in agent workers, with their reasons
from .ratelimit import TAKE_TOKENS  # token buckets for the per-user limits

_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""

ACQUIRE = (
    """
-- acquire: take ownership of a conversation, creating it when asked; its keys stop
-- expiring (a stopped conversation's expire after the retention: RELEASE).
-- KEYS[1]  conversation meta hash   KEYS[2..] its other keys (event stream, inbox,
--          accept tokens, connections)
-- ARGV[1]  node id            ARGV[2] node incarnation
-- ARGV[3]  user ('' = do not check)
-- ARGV[4]  incarnation known to be dead ('' = take it only when unowned)
-- ARGV[5]  '1' to create a missing conversation for ARGV[3]
-- ARGV[6]  when creating: the last id the event store holds of it (ids go on after it;
--          it counts as stored and applied)   ARGV[7] and the store's fence epoch
-- ARGV[8]  and the bytes of its stored events (counted as logged, stored and trimmed)
-- ARGV[9]  close_delay (s) to record when it is created ('' = the nodes' default)
-- ARGV[10] max_running_time (s) to record when it is created ('' = the nodes' default)
-- returns  {status, epoch, owner node, owner incarnation, user, applied, close_delay,
--          max_running_time} (the last two as recorded, '' if not)
--   status: 'created' | 'ok' (ours now, epoch bumped) | 'mine' (already ours)
--           'owned' (a live owner holds it) | 'forbidden' | 'missing'
"""
    + _NOW
    + """
local meta = KEYS[1]
if redis.call('PTTL', meta) >= 0 then
  for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
end
if redis.call('EXISTS', meta) == 0 then
  if ARGV[5] ~= '1' then return {'missing', 0, '', '', '', 0, '', ''} end
  local base, epoch, size = tonumber(ARGV[6]), tonumber(ARGV[7]) + 1, tonumber(ARGV[8])
  redis.call('HSET', meta, 'user', ARGV[3], 'owner', ARGV[1], 'inc', ARGV[2],
             'epoch', epoch, 'state', 'loading', 'seq', base, 'applied', base,
             'stored', base, 'lbytes', size, 'sbytes', size, 'tbytes', size, 'refs', 0,
             'created', now, 'last_active', now)
  if ARGV[9] ~= '' then redis.call('HSET', meta, 'close_delay', ARGV[9]) end
  if ARGV[10] ~= '' then redis.call('HSET', meta, 'max_running_time', ARGV[10]) end
  return {'created', epoch, ARGV[1], ARGV[2], ARGV[3], base, ARGV[9], ARGV[10]}
end
local f = redis.call('HMGET', meta, 'user', 'owner', 'inc', 'epoch', 'applied',
                     'close_delay', 'max_running_time')
local user, owner, inc = f[1] or '', f[2] or '', f[3] or ''
local epoch, applied = tonumber(f[4] or '0'), tonumber(f[5] or '0')
local close, running = f[6] or '', f[7] or ''
if ARGV[3] ~= '' and user ~= ARGV[3] then
  return {'forbidden', epoch, owner, inc, user, applied, close, running}
end
if inc == ARGV[2] then return {'mine', epoch, owner, inc, user, applied, close, running} end
if inc == '' or inc == ARGV[4] then
  epoch = epoch + 1
  redis.call('HSET', meta, 'owner', ARGV[1], 'inc', ARGV[2], 'epoch', epoch,
             'state', 'loading', 'last_active', now)
  return {'ok', epoch, ARGV[1], ARGV[2], user, applied, close, running}
end
return {'owned', epoch, owner, inc, user, applied, close, running}
"""
)

RELEASE = """
-- release: give up ownership of a conversation. With a retention, a conversation the
-- event store holds all of, with no action waiting and no connection, retires: its
-- Redis state expires after the retention (it comes back from the store: ACQUIRE).
-- KEYS[1]  conversation meta hash   KEYS[2..] its other keys, when retiring (as in acquire)
-- ARGV[1]  owner incarnation   ARGV[2] epoch ('' = any)   ARGV[3] state to record
-- ARGV[4]  retention (ms; '' or 0: none)
-- returns  1 when released, 0 when the caller was not the owner
local f = redis.call('HMGET', KEYS[1], 'inc', 'epoch', 'seq', 'stored')
if f[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and tonumber(f[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'owner', '', 'inc', '', 'state', ARGV[3])
local retention = tonumber(ARGV[4] or '') or 0
if retention > 0 and #KEYS >= 5 and tonumber(f[4] or '0') >= tonumber(f[3] or '0')
   and redis.call('XLEN', KEYS[3]) == 0 and redis.call('HLEN', KEYS[5]) == 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], retention) end
end
return 1
"""

# Publishing is skipped when only the writing node listens: a node subscribes to a
# conversation's channel only while it owns the loop (the meta hash's ``inc``) or holds a
# connection in it (the conversation's connections hash, written after the subscription
# is confirmed and before the connection's first log read). The writer applies its own
# events locally, so then nobody needs the copy. ``me`` '' always publishes.
_HEARD_ELSEWHERE = """
local function heard_elsewhere(owner_inc, conns, me)
  if me == '' or (owner_inc ~= '' and owner_inc ~= me) then return true end
  if redis.call('HLEN', conns) > 16 then return true end
  for _, v in ipairs(redis.call('HVALS', conns)) do
    if v ~= me then return true end
  end
  return false
end
"""

ACCEPT = (
    """
-- accept: record a user action durably (event log + inbox) and publish it.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream   KEYS[3] inbox stream
-- KEYS[4]  recent accept tokens (sorted set token -> event id, the last 64)
-- KEYS[5]  conversation's connections (connection id -> incarnation)
-- ARGV[1]  user ('' = do not check)  ARGV[2] packed event (msgpack map without id)
-- ARGV[3]  window events: refused ('behind') while this many events are not stored
-- ARGV[4]  inbox max length   ARGV[5] channel
-- ARGV[6]  token of this accept (unique, or 'c:' + the client's action id): run again
--          (a retry after a lost reply, a client's retry), it returns the first result
-- ARGV[7]  writer's incarnation: no publish when only it listens ('' = always publish)
-- ARGV[8]  floor: the highest event id the writer knows was logged; a lower seq means
--          Redis lost events (a failover to a lagging replica): nothing is written
-- ARGV[9]  '1': do not publish, report whether another node listens (the writer
--          publishes once replicas confirmed the write)
-- ARGV[10] window bytes: refused ('behind') while the events not stored, this one
--          included, would be more bytes
-- ARGV[11] most bytes of the conversation's events (0: no limit)
-- returns  {status, event id, owner node, owner incarnation, others listen (0/1)}
--   status: 'ok' | 'missing' | 'forbidden' | 'full' | 'rewound' (id: the seq found)
--           | 'behind' (the event store lags: {'behind', events not stored, '', '',
--           their bytes}; nothing written) | 'quota' (over ARGV[11]: {'quota', bytes
--           of its events, '', '', 0}; nothing written)
"""
    + _NOW
    + _HEARD_ELSEWHERE
    + """
local f = redis.call('HMGET', KEYS[1], 'user', 'owner', 'inc', 'seq', 'stored', 'lbytes',
                     'sbytes')
if not f[1] then return {'missing', 0, '', '', 0} end
if ARGV[1] ~= '' and f[1] ~= ARGV[1] then return {'forbidden', 0, '', '', 0} end
local seen = redis.call('ZSCORE', KEYS[4], ARGV[6])
if seen then return {'ok', tonumber(seen), f[2] or '', f[3] or '', 0} end
if tonumber(f[4] or '0') < tonumber(ARGV[8]) then
  return {'rewound', tonumber(f[4] or '0'), '', '', 0}
end
if redis.call('PTTL', KEYS[1]) >= 0 then  -- stopped and retiring: it lives on
  for i = 1, 5 do redis.call('PERSIST', KEYS[i]) end
end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[4]) then return {'full', 0, '', '', 0} end
local quota = tonumber(ARGV[11])
if quota > 0 and tonumber(f[6] or '0') + #ARGV[2] > quota then
  return {'quota', tonumber(f[6] or '0'), '', '', 0}
end
local unstored = tonumber(f[4] or '0') - tonumber(f[5] or '0')
local ubytes = tonumber(f[6] or '0') - tonumber(f[7] or '0')
if unstored >= tonumber(ARGV[3]) or ubytes + #ARGV[2] > tonumber(ARGV[10]) then
  return {'behind', unstored, '', '', ubytes}
end
local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[4], id, ARGV[6])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -65)
redis.call('HSET', KEYS[1], 'last_active', now)
redis.call('HINCRBY', KEYS[1], 'lbytes', #ARGV[2])
redis.call('XADD', KEYS[2], id .. '-0', 'd', ARGV[2])
redis.call('XADD', KEYS[3], id .. '-0', 'd', ARGV[2])
local others = heard_elsewhere(f[3] or '', KEYS[5], ARGV[7])
if others and ARGV[9] ~= '1' then
  redis.call('PUBLISH', ARGV[5], '\\146' .. cmsgpack.pack(id) .. ARGV[2])
end
return {'ok', id, f[2] or '', f[3] or '', others and 1 or 0}
"""
)

COMMIT = (
    """
-- commit: append an owner's events, fenced by its incarnation and epoch.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream   KEYS[3] inbox stream
-- KEYS[4]  conversation's connections (connection id -> incarnation)
-- KEYS[5]  recent accept tokens (as in accept)
-- ARGV[1]  owner incarnation ('' = system write, allowed only while unowned)
-- ARGV[2]  epoch   ARGV[3] channel
-- ARGV[4]  id of the action these events answer (0 = none): marks it applied
-- ARGV[5]  index of this write among the writes answering that action (0, 1, ...)
-- ARGV[6]  agent state to record ('' = unchanged)
-- ARGV[7]  writer's incarnation: no publish when only it listens ('' = always publish)
-- ARGV[8]  writer token: a write answering no action (ARGV[4] = 0) is known by
--          (token, index), indexes 1, 2, ... per token ('' = not deduplicated)
-- ARGV[9]  accept token of the action ARGV[4], when the owner dispatched it before its
--          accept answered (speculatively, predicting its id): the write goes through
--          only if that accept logged the action under exactly that id ('' = no check)
-- ARGV[10] floor, as in accept: a lower seq is reported ('rewound') and nothing written
-- ARGV[11] '1': do not publish, report whether another node listens (as in accept)
-- ARGV[12..] packed events (msgpack maps without id)
-- returns  {'ok', first id, last id, now, others listen}, {'dup', 0, 0, now, 0} (this
--          write was already committed: a retry after a lost reply), {'fenced', epoch,
--          0, 0, 0}, {'unaccepted', 0, 0, now, 0} (ARGV[9]'s accept has not logged the
--          action under ARGV[4], or not yet), {'rewound', seq, 0, 0, 0} or
--          {'missing', 0, 0, 0, 0}
"""
    + _NOW
    + _HEARD_ELSEWHERE
    + """
local f = redis.call('HMGET', KEYS[1], 'inc', 'epoch', 'applied', 'user', 'emitted',
                     'wtoken', 'windex', 'seq')
if not f[4] then return {'missing', 0, 0, 0, 0} end
local inc, epoch = f[1] or '', tonumber(f[2] or '0')
if inc ~= ARGV[1] or (ARGV[1] ~= '' and epoch ~= tonumber(ARGV[2])) then
  return {'fenced', epoch, 0, 0, 0}
end
local cause, index = tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[9] ~= '' and tonumber(redis.call('ZSCORE', KEYS[5], ARGV[9]) or '0') ~= cause then
  return {'unaccepted', 0, 0, now, 0}
end
local applied, emitted = tonumber(f[3] or '0'), tonumber(f[5] or '-1')
if cause > 0 and (cause < applied or (cause == applied and index <= emitted)) then
  return {'dup', 0, 0, now, 0}
end
local token = ARGV[8]
if cause == 0 and token ~= '' and f[6] == token and index <= tonumber(f[7] or '0') then
  return {'dup', 0, 0, now, 0}
end
if tonumber(f[8] or '0') < tonumber(ARGV[10]) then
  return {'rewound', tonumber(f[8] or '0'), 0, 0, 0}
end
local first, last = 0, 0
local others = #ARGV >= 12 and heard_elsewhere(inc, KEYS[4], ARGV[7])
local publish = others and ARGV[11] ~= '1'
for i = 12, #ARGV do
  local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  if first == 0 then first = id end
  last = id
  redis.call('XADD', KEYS[2], id .. '-0', 'd', ARGV[i], 'e', epoch)
  redis.call('HINCRBY', KEYS[1], 'lbytes', #ARGV[i])
  if publish then
    redis.call('PUBLISH', ARGV[3], '\\146' .. cmsgpack.pack(id) .. ARGV[i])
  end
end
local fields = {'last_active', now}
if cause > applied then
  fields[#fields + 1] = 'applied'
  fields[#fields + 1] = cause
  redis.call('XTRIM', KEYS[3], 'MINID', (cause + 1) .. '-0')
end
if cause > 0 then
  fields[#fields + 1] = 'emitted'
  fields[#fields + 1] = index
elseif token ~= '' then
  fields[#fields + 1] = 'wtoken'
  fields[#fields + 1] = token
  fields[#fields + 1] = 'windex'
  fields[#fields + 1] = index
end
if ARGV[6] ~= '' then
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = ARGV[6]
end
redis.call('HSET', KEYS[1], unpack(fields))
return {'ok', first, last, now, others and 1 or 0}
"""
)

ADMIT = """
-- admit: claim one of the user's max_concurrent_conversations slots.
-- KEYS[1]  user's claims sorted set (sid -> recency, never more than cap members)
-- KEYS[2]  user's loops hash (sid -> 'live:INC' | 'stopping:INC'; at most cap entries)
-- KEYS[3]  user's organisation string
-- ARGV[1]  sid   ARGV[2] node incarnation   ARGV[3] cap
-- ARGV[4]  'new' (a start: the sid becomes the most recent claim) | 'retry' (still waiting)
-- ARGV[5]  recency score (ms) of a new claim; kept above every other claim
-- ARGV[6]  policy when a new claim finds the cap full: 'evict' | 'reject'
-- ARGV[7]  the user's organisation to record ('' = keep the recorded one)
-- returns  {status, claims, org, evicted sid, its incarnation, evicted sid, ...}
--   status: 'go' (slot held: start the loop) | 'wait' (evicted loops still stopping)
--           'evicted' (more recent conversations took every slot)
--           'rejected' (policy reject and the cap full: nothing changed)
--   claims: the user's claims now; org: the user's organisation ('' = none)
-- A loop may only run while its sid has an entry in loops, and an entry is only removed
-- after its loop stopped, so HLEN(loops) <= cap bounds the loops actually running.

local sid, node, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7]) end
local org = redis.call('GET', KEYS[3]) or ''
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

ENROLL = """
-- enroll: name the node's new incarnation in the registry; the one it replaces goes on
-- the retired list (atomically), so its keys are released even if the node dies before
-- it has released them itself.
-- KEYS[1]  registry hash   KEYS[2] retired hash   ARGV[1] node   ARGV[2] incarnation
-- returns  the replaced incarnation ('' if none)
local prev = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if prev ~= '' and prev ~= ARGV[2] then redis.call('HSET', KEYS[2], prev, ARGV[1]) end
return prev
"""

RENEW = """
-- renew: extend the node's heartbeat lease if it is still this incarnation's.
-- KEYS[1]  node lease string   ARGV[1] incarnation   ARGV[2] ttl (ms)
-- returns  1 renewed, 0 lost (expired or taken by another incarnation)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

DELETE_IF = """
-- delete_if: delete a string key only while it holds the given value.
-- KEYS[1]  key   ARGV[1] expected value
-- returns  1 when deleted
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

HDEL_IF = """
-- hdel_if: delete a hash field only while it holds the given value.
-- KEYS[1]  hash   ARGV[1] field   ARGV[2] expected value
-- returns  1 when deleted
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

ATTACH = """
-- attach: change a conversation's attach refcount, checking it exists and its user.
-- KEYS[1]  conversation meta hash
-- ARGV[1]  delta (+1 / -1)   ARGV[2] user ('' = do not check)
-- returns  {status, refs}: 'ok' | 'missing' | 'forbidden'
local user = redis.call('HGET', KEYS[1], 'user')
if not user then return {'missing', 0} end
if ARGV[2] ~= '' and user ~= ARGV[2] then return {'forbidden', 0} end
local refs = redis.call('HINCRBY', KEYS[1], 'refs', ARGV[1])
if refs < 0 then
  redis.call('HSET', KEYS[1], 'refs', 0)
  refs = 0
end
return {'ok', refs}
"""

REWIND = """
-- rewind: Redis lost the newest events of a conversation (a failover to a replica that
-- had not received them): ids continue after the highest one a node knows was logged,
-- never reused, and a notice takes the first new id so clients learn of the loss.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  floor: the highest event id known to have been logged
-- ARGV[2]  packed notice (msgpack map without id)   ARGV[3] channel
-- returns  {notice id, seq found} when repaired, {0, seq} when seq was not below floor
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local floor = tonumber(ARGV[1])
if seq >= floor or redis.call('EXISTS', KEYS[1]) == 0 then return {0, seq} end
local id = floor + 1
redis.call('HSET', KEYS[1], 'seq', id)
redis.call('HINCRBY', KEYS[1], 'log_epoch', 1)
redis.call('HINCRBY', KEYS[1], 'lbytes', #ARGV[2])
redis.call('XADD', KEYS[2], id .. '-0', 'd', ARGV[2])
redis.call('PUBLISH', ARGV[3], '\\146' .. cmsgpack.pack(id) .. ARGV[2])
return {id, seq}
"""

# -- the event store behind the log (coordinator/archive.py, state/archive.py) -------------
# The meta hash counts the log's bytes: ``lbytes`` every event ever logged, ``sbytes``
# those the store holds (ids up to ``stored``), ``tbytes`` those trimmed from the log.
# So the log holds lbytes - tbytes, and lbytes - sbytes wait for the store.

UNSTORED = """
-- unstored: the oldest events of a conversation the event store does not hold yet.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  most events   ARGV[2] most bytes (at least one event is returned)
-- returns  {stored, id, packed event, id, packed event, ...} (ids above stored)
local stored = tonumber(redis.call('HGET', KEYS[1], 'stored') or '0')
local rows = redis.call('XRANGE', KEYS[2], '(' .. stored .. '-0', '+', 'COUNT', ARGV[1])
local out, bytes = {stored}, 0
for _, row in ipairs(rows) do
  local data = row[2][2]
  if #out > 1 and bytes + #data > tonumber(ARGV[2]) then break end
  bytes = bytes + #data
  out[#out + 1] = tonumber(string.match(row[1], '^(%d+)'))
  out[#out + 1] = data
end
return out
"""

MARK_STORED = """
-- mark_stored: the event store holds a conversation's events up to an id; trim the log
-- to its window (the oldest stored events, while it holds more than either bound; never
-- an event the store does not hold, never the newest).
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  last id the store holds   ARGV[2] window events   ARGV[3] window bytes
-- returns  {stored, events in the log, bytes in the log}
local f = redis.call('HMGET', KEYS[1], 'seq', 'stored', 'lbytes', 'sbytes', 'tbytes')
if not f[1] then return {0, 0, 0} end
local stored = tonumber(f[2] or '0')
local upto = math.min(tonumber(ARGV[1]), tonumber(f[1]))
local sbytes, tbytes = tonumber(f[4] or '0'), tonumber(f[5] or '0')
local size = tonumber(f[3] or '0') - tbytes
if upto > stored then
  for _, row in ipairs(redis.call('XRANGE', KEYS[2], '(' .. stored .. '-0', upto .. '-0')) do
    sbytes = sbytes + #row[2][2]
  end
  stored = upto
  redis.call('HSET', KEYS[1], 'stored', stored, 'sbytes', sbytes)
end
local len = redis.call('XLEN', KEYS[2])
local max_events, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
local start, cut, last = '-', 0, nil
while len > 1 and (len > max_events or size > max_bytes) do
  local rows = redis.call('XRANGE', KEYS[2], start, stored .. '-0', 'COUNT', 100)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    if len <= 1 or (len <= max_events and size <= max_bytes) then break end
    len = len - 1
    size = size - #row[2][2]
    cut = cut + #row[2][2]
    last = row[1]
  end
  if #rows < 100 or last ~= rows[#rows][1] then break end
  start = '(' .. last
end
if last then
  redis.call('XTRIM', KEYS[2], 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
  redis.call('HSET', KEYS[1], 'tbytes', tbytes + cut)
end
return {stored, len, size}
"""

CLAIM_STORE = """
-- claim_store: record the cluster's event store, or report the one already recorded.
-- KEYS[1]  cluster's store hash (identity, store, node)
-- ARGV[1]  identity of this node's store   ARGV[2] its URL (no password)   ARGV[3] node
-- returns  {identity, store, node} as recorded (this node's when it was the first)
if redis.call('HSETNX', KEYS[1], 'identity', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'store', ARGV[2], 'node', ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'identity', 'store', 'node')
"""

ALL = {
    "acquire": ACQUIRE,
    "release": RELEASE,
    "accept": ACCEPT,
    "commit": COMMIT,
    "admit": ADMIT,
    "release_slot": RELEASE_SLOT,
    "org_admit": ORG_ADMIT,
    "org_prune": ORG_PRUNE,
    "enroll": ENROLL,
    "renew": RENEW,
    "delete_if": DELETE_IF,
    "hdel_if": HDEL_IF,
    "attach": ATTACH,
    "rewind": REWIND,
    "claim_store": CLAIM_STORE,
    "unstored": UNSTORED,
    "mark_stored": MARK_STORED,
    "attempts": ATTEMPTS,
    "take_tokens": _NOW + TAKE_TOKENS,
}


def for_deployment(*, sharded: bool) -> dict[str, str]:
    """The scripts for a deployment: on Redis Cluster they publish with SPUBLISH, so a
    message reaches only the shard of its conversation (its channel carries the
    conversation's hash tag, the script's slot), never every node of the cluster."""
    if not sharded:
        return dict(ALL)
    return {
        name: src.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        for name, src in ALL.items()
    }
