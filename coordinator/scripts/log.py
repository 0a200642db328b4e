"""The conversation's log: accepting an action into the inbox and the log, committing
an agent's events, continuing the ids after Redis lost some (rewind)."""

from __future__ import annotations

from .clock import NOW

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
--          publishes once replicas confirmed the write, a retry's too); a retry writes
--          (last_active)
-- ARGV[10] window bytes: refused ('behind') while the events not stored, this one
--          included, would be more bytes
-- ARGV[11] most bytes of the conversation's events (0: no limit)
-- returns  {status, event id, owner node, owner incarnation, others listen (0/1)}
--   status: 'ok' | 'missing' | 'forbidden' | 'full' | 'rewound' (id: the seq found)
--           | 'behind' (the event store lags: {'behind', events not stored, '', '',
--           their bytes}; nothing written) | 'quota' (over ARGV[11]: {'quota', bytes
--           of its events, '', '', 0}; nothing written)
"""
    + NOW
    + _HEARD_ELSEWHERE
    + """
local f = redis.call('HMGET', KEYS[1], 'user', 'owner', 'inc', 'seq', 'stored', 'lbytes',
                     'sbytes', 'largest')
if not f[1] then return {'missing', 0, '', '', 0} end
if ARGV[1] ~= '' and f[1] ~= ARGV[1] then return {'forbidden', 0, '', '', 0} end
local seen = redis.call('ZSCORE', KEYS[4], ARGV[6])
if seen then
  if ARGV[9] ~= '1' then return {'ok', tonumber(seen), f[2] or '', f[3] or '', 0} end
  -- The first one may not have been confirmed, nor published: a write, so that the WAIT
  -- after this covers it (recent Redis versions wait for the connection's last command
  -- that wrote: a new connection, after a reconnect, has none), and whether to publish.
  redis.call('HSET', KEYS[1], 'last_active', now)
  local others = heard_elsewhere(f[3] or '', KEYS[5], ARGV[7])
  return {'ok', tonumber(seen), f[2] or '', f[3] or '', others and 1 or 0}
end
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
if f[8] and #ARGV[2] > tonumber(f[8]) then
  redis.call('HSET', KEYS[1], 'last_active', now, 'largest', #ARGV[2])
else
  redis.call('HSET', KEYS[1], 'last_active', now)
end
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
-- ARGV[11] '1': do not publish, report whether another node listens; a dup writes
--          (last_active), as in accept
-- ARGV[12..] packed events (msgpack maps without id)
-- returns  {'ok', first id, last id, now, others listen}, {'dup', 0, 0, now, 0} (this
--          write was already committed: a retry after a lost reply), {'fenced', epoch,
--          0, 0, 0}, {'unaccepted', 0, 0, now, 0} (ARGV[9]'s accept has not logged the
--          action under ARGV[4], or not yet), {'rewound', seq, 0, 0, 0} or
--          {'missing', 0, 0, 0, 0}
"""
    + NOW
    + _HEARD_ELSEWHERE
    + """
local f = redis.call('HMGET', KEYS[1], 'inc', 'epoch', 'applied', 'user', 'emitted',
                     'wtoken', 'windex', 'seq', 'largest')
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
local token = ARGV[8]
if (cause > 0 and (cause < applied or (cause == applied and index <= emitted)))
    or (cause == 0 and token ~= '' and f[6] == token and index <= tonumber(f[7] or '0')) then
  -- a write, so that the WAIT after it covers the first one (as in accept)
  if ARGV[11] == '1' then redis.call('HSET', KEYS[1], 'last_active', now) end
  return {'dup', 0, 0, now, 0}
end
if tonumber(f[8] or '0') < tonumber(ARGV[10]) then
  return {'rewound', tonumber(f[8] or '0'), 0, 0, 0}
end
local first, last, largest = 0, 0, tonumber(f[9] or '-1')
local others = #ARGV >= 12 and heard_elsewhere(inc, KEYS[4], ARGV[7])
local publish = others and ARGV[11] ~= '1'
for i = 12, #ARGV do
  local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  if first == 0 then first = id end
  last = id
  redis.call('XADD', KEYS[2], id .. '-0', 'd', ARGV[i], 'e', epoch)
  redis.call('HINCRBY', KEYS[1], 'lbytes', #ARGV[i])
  if largest >= 0 and #ARGV[i] > largest then largest = #ARGV[i] end
  if publish then
    redis.call('PUBLISH', ARGV[3], '\\146' .. cmsgpack.pack(id) .. ARGV[i])
  end
end
local fields = {'last_active', now}
if largest > tonumber(f[9] or '-1') then
  fields[#fields + 1] = 'largest'
  fields[#fields + 1] = largest
end
if cause > applied then
  fields[#fields + 1] = 'applied'
  fields[#fields + 1] = cause
  redis.call('XTRIM', KEYS[3], 'MINID', (cause + 1) .. '-0')
  -- an empty stream still costs ~400 B: none while no action waits (ids are explicit)
  if redis.call('XLEN', KEYS[3]) == 0 then redis.call('DEL', KEYS[3]) end
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

REWIND = """
-- rewind: Redis lost the newest events of a conversation (a failover to a replica that
-- had not received them): ids continue after the highest one a node knows was logged,
-- never reused, and a notice takes the first new id so clients learn of the loss.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  floor: the highest event id known to have been logged
-- ARGV[2]  packed notice (msgpack map without id)   ARGV[3] channel
-- returns  {notice id, seq found} when repaired, {0, seq} when seq was not below floor
local f = redis.call('HMGET', KEYS[1], 'seq', 'largest')
local seq = tonumber(f[1] or '0')
local floor = tonumber(ARGV[1])
if seq >= floor or redis.call('EXISTS', KEYS[1]) == 0 then return {0, seq} end
local id = floor + 1
redis.call('HSET', KEYS[1], 'seq', id)
if f[2] and #ARGV[2] > tonumber(f[2]) then redis.call('HSET', KEYS[1], 'largest', #ARGV[2]) end
redis.call('HINCRBY', KEYS[1], 'log_epoch', 1)
redis.call('HINCRBY', KEYS[1], 'lbytes', #ARGV[2])
redis.call('XADD', KEYS[2], id .. '-0', 'd', ARGV[2])
redis.call('PUBLISH', ARGV[3], '\\146' .. cmsgpack.pack(id) .. ARGV[2])
return {id, seq}
"""

# The logged events with ids above ``after`` (KEYS[2] the event stream): at most ``count``
# and none after those whose packed size reaches ``max_bytes`` (at least one), read a few
# at a time, so that a script holds no more of the log than that however large its events,
# appended to ``out`` (what the caller puts first) as id, packed event, id, packed event,
# ... A reader's page and the store's batch alike. (Every entry a script reads costs Redis
# about 1.5 us, against 0.2 us for a plain XRANGE: readers that know the conversation's
# ``largest`` event read with XRANGE where its count bounds the bytes: state/core.py.)
READ_AFTER = """
local function read_after(out, after, count, max_bytes)
  local from, left, bytes = '(' .. after .. '-0', tonumber(count), 0
  while left > 0 do
    local want = math.min(left, 16)
    local rows = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', want)
    for _, row in ipairs(rows) do
      out[#out + 1] = tonumber(string.match(row[1], '^(%d+)'))
      out[#out + 1] = row[2][2]
      bytes = bytes + #row[2][2]
      if bytes >= max_bytes then return out end
    end
    if #rows < want then return out end
    left = left - want
    from = '(' .. rows[#rows][1]
  end
  return out
end
"""

READ = (
    """
-- read: a page of a conversation's log for a reader (a client's replay, a REST page, an
-- agent's history), bounded in bytes as well as in events, however large they are (an
-- agent's may be a MiB each; a count alone, sized by earlier events, read hundreds).
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  after   ARGV[2] most events   ARGV[3] most bytes (as read_after)
-- returns  {the conversation's last id, the bytes of its largest event (both nil when
--          unknown: no record; a record older than the field), id, packed event, ...}
"""
    + READ_AFTER
    + """
local f = redis.call('HMGET', KEYS[1], 'seq', 'largest')
return read_after({f[1], f[2]}, ARGV[1], ARGV[2], tonumber(ARGV[3]))
"""
)
