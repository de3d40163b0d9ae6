-- reserve: all-or-nothing reservation of one request's worst case on every line.
-- KEYS: leases, reservation, counter of each line.
-- ARGV: prefix, request id, "now lease_until sweep_max ledger_max", then one string of 7 per line:
--       usd, tokens, requests, usd limit, tokens limit, requests limit (-1 = unlimited), expires_ms.
-- Returns {1, 0, 0, states} reserved, {0, line, unit, states} refused, {-1} id already reserved
-- (states: see append_states).
local prefix, request_id = ARGV[1], ARGV[2]
local now_text, lease_until, sweep_max, ledger_max = unpack(words(ARGV[3]))
local now = tonumber(now_text)
local values = words(ARGV[4])
local counters = {unpack(KEYS, 3)}

local function line_base(i)
  return (i - 1) * 7
end

-- The first line and unit where spent + reserved + amount would pass the limit; nil when all fit.
-- (limit - spent - reserved keeps every intermediate value exact below 2^53.)
local function first_excess()
  for i, counter in ipairs(counters) do
    local base, state = line_base(i), counter_state(counter)
    for unit = 1, 3 do
      local amount, limit = tonumber(values[base + unit]), tonumber(values[base + 3 + unit])
      if limit >= 0 and amount > limit - state[unit] - state[unit + 3] then
        return i, unit
      end
    end
  end
  return nil
end

sweep_expired(prefix, now_text, tonumber(sweep_max), ledger_max)
if live_reservation(prefix, request_id, now, ledger_max) then
  return {-1}
end
local refused_line, refused_unit = first_excess()
if refused_line then
  return append_states({0, refused_line, refused_unit}, counters)
end

local latest = 0
for i, counter in ipairs(counters) do
  local base = line_base(i)
  local expires_ms = values[base + 7]
  apply(counter, amounts_at(values, base), NOTHING, expires_ms)
  local stored = table.concat({values[base + 1], values[base + 2], values[base + 3], expires_ms}, ' ')
  redis.call('HSET', KEYS[2], counter, stored)
  latest = math.max(latest, tonumber(expires_ms))
end
redis.call('PEXPIREAT', KEYS[2], int(latest))
redis.call('ZADD', KEYS[1], lease_until, request_id)
return append_states({1, 0, 0}, counters)
