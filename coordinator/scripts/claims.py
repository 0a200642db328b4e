"""Facts about the cluster every node must agree on (its event store, the layout of its
data in Redis): recorded by the first node, checked by the others."""

from __future__ import annotations

CLAIM = """
-- claim: record a cluster fact (a hash) unless one is recorded, or replace the one that
-- is; report it as recorded.
-- KEYS[1]  the fact's hash
-- ARGV[1]  '': record it only if the hash has no ARGV[2] field; else replace it only if
--          that field still holds ARGV[1]
-- ARGV[2..]  field, value, field, value, ... (the first field names the fact)
-- returns  the values of those fields as recorded after the call
local fields = {}
for i = 2, #ARGV, 2 do fields[#fields + 1] = ARGV[i] end
local current = redis.call('HGET', KEYS[1], ARGV[2])
if (ARGV[1] == '' and not current) or (ARGV[1] ~= '' and current == ARGV[1]) then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
end
return redis.call('HMGET', KEYS[1], unpack(fields))
"""
