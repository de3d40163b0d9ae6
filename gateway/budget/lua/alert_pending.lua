-- alert_pending: alerts claimed but not delivered whose lease ended, oldest lease first.
-- KEYS: the alert leases zset.  ARGV: prefix, [now_ms, limit].
-- Returns {key, payload, key, payload, ...}; members whose alert expired are dropped on the way.
local now, limit = unpack(cjson.decode(ARGV[2]))
local found = {}
for _, member in ipairs(call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0, limit)) do
  local alert = ARGV[1] .. 'alert:' .. member
  local payload = call('TYPE', alert).ok == 'hash' and call('HGET', alert, 'payload')
  if payload then
    found[#found + 1] = member
    found[#found + 1] = payload
  else
    call('ZREM', KEYS[1], member)
  end
end
return found
