"""Ownership of conversations and the node registry: acquire and release a
conversation (its fencing epoch), a node's incarnations and lease, conditional deletes,
attach refcounts."""

from __future__ import annotations

from .clock import NOW

ACQUIRE = (
    """
-- acquire: take ownership of a conversation, creating it when asked; its keys stop
-- expiring (a stopped conversation's expire after the retention: RELEASE).
-- KEYS[1]  conversation meta hash   KEYS[2..#KEYS-1] its other keys (event stream,
--          inbox, accept tokens, connections)   KEYS[#KEYS] its purge mark
-- ARGV[1]  node id            ARGV[2] node incarnation
-- ARGV[3]  user ('' = do not check)
-- ARGV[4]  incarnation known to be dead ('' = take it only when unowned)
-- ARGV[5]  '1' to create a missing conversation for ARGV[3]
-- ARGV[6]  when creating: the last id the event store holds of it (ids go on after it;
--          it counts as stored and applied)   ARGV[7] and the store's fence epoch
-- ARGV[8]  and the bytes of its stored events (counted as logged, stored and trimmed)
-- ARGV[9]  close_delay (s) to record when it is created ('' = the nodes' default)
-- ARGV[10] max_running_time (s) to record when it is created ('' = the nodes' default)
-- ARGV[11] the latest event id a joining client saw ('' = none): past the last event,
--          nothing is created or taken ('ahead', the last event id in place of applied)
-- ARGV[12] when creating one the event store holds: when the store first recorded it
--          (ms; '0' = now), kept as its creation time
-- returns  {status, epoch, owner node, owner incarnation, user, applied, close_delay,
--          max_running_time} (the last two as recorded, '' if not)
--   status: 'created' | 'ok' (ours now, epoch bumped) | 'mine' (already ours; epoch bumped too)
--           'owned' (a live owner holds it) | 'forbidden' | 'missing'
--           'purging' (a purge is deleting it: nobody takes it meanwhile) | 'ahead'
"""
    + NOW
    + """
local meta = KEYS[1]
if redis.call('EXISTS', KEYS[#KEYS]) == 1 then return {'purging', 0, '', '', '', 0, '', ''} end
if redis.call('EXISTS', meta) == 0 then
  if ARGV[5] ~= '1' then return {'missing', 0, '', '', '', 0, '', ''} end
  local base, epoch, size = tonumber(ARGV[6]), tonumber(ARGV[7]) + 1, tonumber(ARGV[8])
  if ARGV[11] ~= '' and tonumber(ARGV[11]) > base then
    return {'ahead', 0, '', '', '', base, '', ''}
  end
  redis.call('HSET', meta, 'user', ARGV[3], 'owner', ARGV[1], 'inc', ARGV[2],
             'epoch', epoch, 'state', 'loading', 'seq', base, 'applied', base,
             'stored', base, 'lbytes', size, 'sbytes', size, 'tbytes', size, 'refs', 0,
             'largest', 0, 'created', tonumber(ARGV[12]) > 0 and ARGV[12] or now,
             'last_active', now)
  if ARGV[9] ~= '' then redis.call('HSET', meta, 'close_delay', ARGV[9]) end
  if ARGV[10] ~= '' then redis.call('HSET', meta, 'max_running_time', ARGV[10]) end
  return {'created', epoch, ARGV[1], ARGV[2], ARGV[3], base, ARGV[9], ARGV[10]}
end
local f = redis.call('HMGET', meta, 'user', 'owner', 'inc', 'epoch', 'applied',
                     'close_delay', 'max_running_time', 'seq')
local user, owner, inc = f[1] or '', f[2] or '', f[3] or ''
local epoch, applied = tonumber(f[4] or '0'), tonumber(f[5] or '0')
local close, running = f[6] or '', f[7] or ''
if ARGV[3] ~= '' and user ~= ARGV[3] then
  return {'forbidden', epoch, owner, inc, user, applied, close, running}
end
-- Already ours ('mine': an earlier start of this incarnation failed, and its release may
-- still be on its way) is taken again with a new epoch too, so that late release cannot
-- undo this start.
if inc == ARGV[2] or inc == '' or inc == ARGV[4] then
  local last = tonumber(f[8] or '0')
  if ARGV[11] ~= '' and tonumber(ARGV[11]) > last then
    return {'ahead', epoch, owner, inc, user, last, close, running}
  end
  if redis.call('PTTL', meta) >= 0 then  -- retiring: taken, its keys expire no more
    for i = 1, #KEYS - 1 do redis.call('PERSIST', KEYS[i]) end
  end
  epoch = epoch + 1
  redis.call('HSET', meta, 'owner', ARGV[1], 'inc', ARGV[2], 'epoch', epoch,
             'state', 'loading', 'last_active', now)
  local status = 'ok'
  if inc == ARGV[2] then status = 'mine' end
  return {status, epoch, ARGV[1], ARGV[2], user, applied, close, running}
end
return {'owned', epoch, owner, inc, user, applied, close, running}
"""
)

RELEASE = """
-- release: give up ownership of a conversation. With a retention, a conversation the
-- event store holds all of, with no action waiting and no connection, retires: its
-- Redis state expires after the retention (it comes back from the store: ACQUIRE).
-- KEYS[1]  conversation meta hash   KEYS[2..] its other keys, when retiring (as in acquire)
-- ARGV[1]  owner incarnation ('' = none: retire an unowned one)   ARGV[2] epoch ('' =
--          any)   ARGV[3] state to record ('' = keep it: only with no owner)
-- ARGV[4]  retention (ms; '' or 0: none)
-- returns  1 when released, 2 when released and retiring (its user's index lists it no
--          more: the store does, if it holds events), 0 when the caller was not the
--          owner (or the record is gone)
local f = redis.call('HMGET', KEYS[1], 'inc', 'epoch', 'seq', 'stored')
if f[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and tonumber(f[2]) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'owner', '', 'inc', '', 'state', ARGV[3])
end
local retention = tonumber(ARGV[4] or '') or 0
local seq = tonumber(f[3] or '0')
if retention > 0 and #KEYS >= 5 and tonumber(f[4] or '0') >= seq
   and redis.call('XLEN', KEYS[3]) == 0 and redis.call('HLEN', KEYS[5]) == 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], retention) end
  return 2
end
return 1
"""

# Publishing is skipped when only the writing node listens: a node subscribes to a
# conversation's channel only while it owns the loop (the meta hash's ``inc``) or holds a
# connection in it (the conversation's connections hash, written after the subscription
# is confirmed and before the connection's first log read). The writer applies its own
# events locally, so then nobody needs the copy. ``me`` '' always publishes.

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
-- renew: extend a lease (a node's heartbeat, a lock) while it still holds the value.
-- KEYS[1]  lease string   ARGV[1] its holder (an incarnation, a node)   ARGV[2] ttl (ms)
-- returns  1 renewed, 0 lost (expired or taken by another)
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
