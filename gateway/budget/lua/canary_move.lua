-- canary_move: move a canary ramping at one step to another step and status, its tallies cleared
-- (see BudgetStore.canary_move).
-- KEYS: the canary's hash.  ARGV: [from_step, to_step, now_ms, expires_ms], the new status.
-- Returns 1 when it moved, 0 when it was not ramping at from_step.
local canary = KEYS[1]
local from, to, now, expires = unpack(cjson.decode(ARGV[1]))
local at, status = unpack(call('HMGET', canary, 'step', 'status'))
if tonumber(at) ~= from or status ~= 'ramping' then
  return 0
end
call('DEL', canary)
call('HSET', canary, 'step', int(to), 'status', ARGV[2], 'since', int(now))
call('PEXPIRE', canary, int(math.max(1, expires - now)))
return 1
