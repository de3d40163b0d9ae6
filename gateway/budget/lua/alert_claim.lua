-- alert_claim: claim the delivery of one budget alert until a lease ends (see BudgetStore.claim_alert).
-- KEYS: the alert's hash, the alert leases zset.  ARGV: the alert key, payload, [now_ms, lease_ms, expires_ms].
-- The hash holds payload, lease (ms) and, once delivered, done; it expires at the alert window's end.
-- Returns 1 when the caller holds the claim now, else 0.
local alert, leases = KEYS[1], KEYS[2]
local now, lease, expires = unpack(cjson.decode(ARGV[3]))
local kind = call('TYPE', alert).ok
if kind == 'string' then
  return 0   -- the marker of an earlier release: that alert was claimed and announced
end
if kind == 'hash' then
  local done, held = unpack(call('HMGET', alert, 'done', 'lease'))
  if done or (held and tonumber(held) >= now) then
    return 0
  end
  call('HSET', alert, 'lease', int(lease))
else
  call('HSET', alert, 'payload', ARGV[2], 'lease', int(lease))
  call('PEXPIREAT', alert, int(expires))
end
call('ZADD', leases, int(lease), ARGV[1])
return 1
