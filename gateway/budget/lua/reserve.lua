-- reserve: all-or-nothing reservation of one request's worst case on every line.
-- KEYS: leases, reservation, counter of each line.
-- ARGV: prefix, request id, [now, lease_until, sweep_max, ledger_max, room, then 7 numbers per line:
--       usd, tokens, requests, usd limit, tokens limit, requests limit (-1 = unlimited), expires_ms].
-- Refused unless room x each amount fits (room 1: the amount itself).
-- Returns {1} reserved, {0, line, unit} refused by that line and unit (nothing changed), {-1} id
-- already reserved.
local prefix, request_id = ARGV[1], ARGV[2]
local values = cjson.decode(ARGV[3])
local now, lease_until, sweep_max, ledger_max, room = values[1], values[2], values[3], values[4], values[5]

sweep_expired(prefix, now, sweep_max, ledger_max)
if live_reservation(prefix, request_id, now, ledger_max) then
  return {-1}
end

-- Every counter is read and checked before any is written. (limit - spent - reserved keeps every value
-- exact below 2^53.)
local states = {}
for i = 3, #KEYS do
  local state, base = counter_state(KEYS[i]), 5 + (i - 3) * 7
  for unit = 1, 3 do
    local limit = values[base + 3 + unit]
    if limit >= 0 and room * values[base + unit] > limit - state[unit] - state[unit + 3] then
      return {0, i - 2, unit}
    end
  end
  states[i] = state
end

-- Only the reserved fields change; a counter that had none is new and gets its expiry.
local held, latest = {}, 0
for i = 3, #KEYS do
  local counter, state, base = KEYS[i], states[i], 5 + (i - 3) * 7
  local usd, tokens, requests, expires_ms = values[base + 1], values[base + 2], values[base + 3], values[base + 7]
  local created = call('HSET', counter, 'reserved_usd', int(state[4] + usd), 'reserved_tokens', int(state[5] + tokens),
    'reserved_requests', int(state[6] + requests))
  if created > 0 then
    call('PEXPIREAT', counter, int(expires_ms))
  end
  held[#held + 1] = counter
  held[#held + 1] = format('%d %d %d %d', usd, tokens, requests, expires_ms)
  latest = math.max(latest, expires_ms)
end
call('HSET', KEYS[2], unpack(held))
call('PEXPIREAT', KEYS[2], int(latest))
call('ZADD', KEYS[1], score(lease_until), request_id)
return {1}
