-- reserve: all-or-nothing reservation of one worst case, under one request id or under several spare
-- ids at once (each id holds the same lines).
-- KEYS: leases, the reservation of each id, counter of each line.
-- ARGV: prefix, first id, [now, lease_until, sweep_max, ledger_max, room, then 7 numbers per line:
--       usd, tokens, requests, usd limit, tokens limit, requests limit (-1 = unlimited), expires_ms],
--       further ids.
-- Refused unless (ids + room - 1) x each amount fits (one id, room 1: the amount itself).
-- Returns {1} reserved, {0, line, unit, held} refused by that line and unit (nothing changed), {-1} an
-- id already reserved. held 0: that amount alone does not fit beside the spend (reported before any line
-- that is only busy); held 1: every amount fits beside the spend, reservations in flight hold the room.
local prefix = ARGV[1]
local ids = {ARGV[2], unpack(ARGV, 4)}
local values = cjson.decode(ARGV[3])
local now, lease_until, sweep_max, ledger_max, room = values[1], values[2], values[3], values[4], values[5]
local first = 2 + #ids        -- KEYS index of the first counter

sweep_expired(prefix, now, sweep_max, ledger_max)
for _, id in ipairs(ids) do
  if live_reservation(prefix, id, now, ledger_max) then
    return {-1}
  end
end

-- Every counter is read and checked before any is written. (limit - spent - reserved keeps every value
-- exact below 2^53.)
local states, times, busy = {}, #ids + room - 1, nil
for i = first, #KEYS do
  local state, base = counter_state(KEYS[i]), 5 + (i - first) * 7
  for unit = 1, 3 do
    local limit, amount = values[base + 3 + unit], values[base + unit]
    if limit >= 0 then
      if amount > limit - state[unit] then
        return {0, i - first + 1, unit, 0}
      end
      if not busy and times * amount > limit - state[unit] - state[unit + 3] then
        busy = {0, i - first + 1, unit, 1}
      end
    end
  end
  states[i] = state
end
if busy then
  return busy
end

-- Only the reserved fields change; a counter that had none is new and gets its expiry.
local held, latest = {}, 0
for i = first, #KEYS do
  local counter, state, base = KEYS[i], states[i], 5 + (i - first) * 7
  local usd, tokens, requests, expires_ms = values[base + 1], values[base + 2], values[base + 3], values[base + 7]
  local created = call('HSET', counter, 'reserved_usd', int(state[4] + #ids * usd),
    'reserved_tokens', int(state[5] + #ids * tokens), 'reserved_requests', int(state[6] + #ids * requests))
  if created > 0 then
    call('PEXPIREAT', counter, int(expires_ms))
  end
  held[#held + 1] = counter
  held[#held + 1] = format('%d %d %d %d', usd, tokens, requests, expires_ms)
  latest = math.max(latest, expires_ms)
end
local leases, lease = {}, score(lease_until)
for k, id in ipairs(ids) do
  call('HSET', KEYS[1 + k], unpack(held))
  call('PEXPIREAT', KEYS[1 + k], int(latest))
  leases[#leases + 1] = lease
  leases[#leases + 1] = id
end
call('ZADD', KEYS[1], unpack(leases))
return {1}
