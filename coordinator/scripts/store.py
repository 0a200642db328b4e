"""The event store behind the log (``archive.py``, ``state/archive.py``): what it
does not hold yet, how far it holds, the window trimmed behind it, the cluster's store."""

from __future__ import annotations

from .log import READ_AFTER

# The meta hash counts the log's bytes: ``lbytes`` every event ever logged, ``sbytes``
# those the store holds (ids up to ``stored``), ``tbytes`` those trimmed from the log.
# So the log holds lbytes - tbytes, and lbytes - sbytes wait for the store.

UNSTORED = (
    """
-- unstored: the oldest events of a conversation the event store does not hold yet.
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  most events   ARGV[2] most bytes (as read_after: at least one event)
-- returns  {stored, id, packed event, id, packed event, ...} (ids above stored)
"""
    + READ_AFTER
    + """
local stored = tonumber(redis.call('HGET', KEYS[1], 'stored') or '0')
return read_after({stored}, stored, ARGV[1], tonumber(ARGV[2]))
"""
)

MARK_STORED = (
    """
-- mark_stored: the event store holds a conversation's events up to an id; trim the log
-- to its window (the oldest stored events, while it holds more than either bound; never
-- an event the store does not hold, never the newest).
-- KEYS[1]  conversation meta hash   KEYS[2] event stream
-- ARGV[1]  last id the store holds   ARGV[2] window events   ARGV[3] window bytes
-- ARGV[4]  most events   ARGV[5] most bytes: of the next batch, as unstored's
-- returns  as unstored: what the store lacks now (so a mover under a flood goes on
--          without another call), nothing once the conversation is gone
"""
    + READ_AFTER
    + """
local f = redis.call('HMGET', KEYS[1], 'seq', 'stored', 'lbytes', 'sbytes', 'tbytes')
if not f[1] then return {tonumber(ARGV[1])} end
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
local start, cut, last, want = '-', 0, nil, 4
while len > 1 and (len > max_events or size > max_bytes) do
  -- Entries are read for their sizes, whole: over the count bound alone, as many as it
  -- needs; over the byte bound, a few first, then more (a window of large events read 100
  -- at a time copied megabytes into the script to trim one or two).
  local n = want
  if size <= max_bytes then n = math.max(1, math.min(100, len - max_events)) end
  local rows = redis.call('XRANGE', KEYS[2], start, stored .. '-0', 'COUNT', n)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    if len <= 1 or (len <= max_events and size <= max_bytes) then break end
    len = len - 1
    size = size - #row[2][2]
    cut = cut + #row[2][2]
    last = row[1]
  end
  if #rows < n or last ~= rows[#rows][1] then break end
  start = '(' .. last
  want = math.min(100, want * 2)
end
if last then
  redis.call('XTRIM', KEYS[2], 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
  redis.call('HSET', KEYS[1], 'tbytes', tbytes + cut)
end
return read_after({stored}, stored, ARGV[4], tonumber(ARGV[5]))
"""
)

REWIND_STORED = (
    """
-- rewind_stored: the event store holds a conversation only up to an id below what was
-- recorded (it lost its latest writes: a failover to a replica that lagged, a restore
-- from an older backup): record that, so that what follows is stored again (what the
-- log still holds as logged; what it trimmed already, as lost).
-- Nothing changes while a purge holds the conversation (its store emptied on purpose),
-- nor once the mark is no longer the one the caller saw (another mover, a sweep, another
-- node's audit moved it meanwhile).
-- KEYS[1]  conversation meta hash   KEYS[2] event stream   KEYS[3] its purge mark
-- ARGV[1]  last id the store holds   ARGV[2] most events   ARGV[3] most bytes: as unstored
-- ARGV[4]  the mark (stored) the caller saw
-- returns  as unstored, nothing once the conversation is gone
"""
    + READ_AFTER
    + """
-- The bytes of the log's entries from..to (stream ids), read 100 at a time.
local function logged_bytes(from, to)
  local sum = 0
  while true do
    local rows = redis.call('XRANGE', KEYS[2], from, to, 'COUNT', 100)
    for _, row in ipairs(rows) do sum = sum + #row[2][2] end
    if #rows < 100 then return sum end
    from = '(' .. rows[#rows][1]
  end
end
local f = redis.call('HMGET', KEYS[1], 'seq', 'stored', 'sbytes', 'tbytes')
if not f[1] then return {tonumber(ARGV[1])} end
local stored, held = tonumber(f[2] or '0'), tonumber(ARGV[1])
if held < stored and stored == tonumber(ARGV[4]) and redis.call('EXISTS', KEYS[3]) == 0 then
  -- What the store holds now: the trimmed events (tbytes; those after held are stored
  -- again as lost, which they are) and the log's up to held. Counted on the shorter side
  -- of held: a rewind over a whole window read it all into the script at once.
  local sbytes, tbytes = tonumber(f[3] or '0'), tonumber(f[4] or '0')
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  local low = oldest and tonumber(string.match(oldest[1], '^(%d+)')) or stored + 1
  if held - low < stored - held then
    sbytes = tbytes + (held >= low and logged_bytes('-', held .. '-0') or 0)
  else
    sbytes = sbytes - logged_bytes('(' .. held .. '-0', stored .. '-0')
  end
  stored = held
  redis.call('HSET', KEYS[1], 'stored', stored, 'sbytes', sbytes)
end
return read_after({stored}, stored, ARGV[2], tonumber(ARGV[3]))
"""
)

STORE_SERVER = """
-- store_server: what a node tells the cluster of its event store, each sweep: the server
-- its connections reach, and whether it found a reason for a check of every conversation
-- since it last told (a loss, a move to another server: ARGV[2]). Another server than
-- the one recorded (a failover, which may have lost acknowledged writes) is one too. A
-- reason owes a check numbered after the last that began ('owed', never going back).
-- KEYS[1]  the store's checks (keys.store_audits: began, done, server, owed)
-- ARGV[1]  the server (EventStore.server; '': not known)   ARGV[2] '1': a reason found
-- returns  {the number a check must reach to settle what is owed (0: nothing owed),
--           1 if this call found another server recorded}
local before = redis.call('HGET', KEYS[1], 'server')
local changed = 0
local owes = ARGV[2] == '1'
if ARGV[1] ~= '' and before ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'server', ARGV[1])
  if before then
    changed = 1
    owes = true
  end
end
if owes then
  local began = tonumber(redis.call('HGET', KEYS[1], 'began') or '0')
  if began + 1 > tonumber(redis.call('HGET', KEYS[1], 'owed') or '0') then
    redis.call('HSET', KEYS[1], 'owed', began + 1)
  end
end
local f = redis.call('HMGET', KEYS[1], 'owed', 'done')
local owed, done = tonumber(f[1] or '0'), tonumber(f[2] or '0')
if owed <= done then owed = 0 end
return {owed, changed}
"""

AUDIT_DONE = """
-- audit_done: a check of every conversation ended. 'done' keeps the greatest number
-- that ended: a check that outlived its lock may end after a later one.
-- KEYS[1]  the store's checks (keys.store_audits)   ARGV[1] the check's number
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'done') or '0') then
  redis.call('HSET', KEYS[1], 'done', ARGV[1])
end
return 0
"""
