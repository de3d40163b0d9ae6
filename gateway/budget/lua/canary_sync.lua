-- canary_sync: add a replica's arm tallies to a canary ramping at their step, and read it back
-- (see BudgetStore.canary_sync).
-- KEYS: the canary's hash.  ARGV: [step, now_ms, expires_ms], then field, delta, field, delta ...
-- The hash holds step, status, since (ms) and the tally fields of the current step (canary_record.py); it
-- expires expires_ms - now_ms after the call (relative: Redis's clock may differ from the caller's).
-- Returns the hash as a flat field, value list.
local canary = KEYS[1]
local step, now, expires = unpack(cjson.decode(ARGV[1]))
if call('EXISTS', canary) == 0 then
  call('HSET', canary, 'step', 0, 'status', 'ramping', 'since', int(now))
end
local at, status = unpack(call('HMGET', canary, 'step', 'status'))
if #ARGV > 1 and tonumber(at) == step and status == 'ramping' then
  for i = 2, #ARGV, 2 do
    call('HINCRBY', canary, ARGV[i], ARGV[i + 1])
  end
end
call('PEXPIRE', canary, int(math.max(1, expires - now)))
return call('HGETALL', canary)
