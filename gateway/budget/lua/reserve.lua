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

-- The first line and unit where spent + reserved + amount would pass the limit (nil when all fit), and
-- the state of every line's counter. (limit - spent - reserved keeps every value exact below 2^53.)
local function first_excess()
  local states = {}
  for i, counter in ipairs(counters) do
    states[i] = counter_state(counter)
  end
  for i, state in ipairs(states) do
    local base = line_base(i)
    for unit = 1, 3 do
      local amount, limit = tonumber(values[base + unit]), tonumber(values[base + 3 + unit])
      if limit >= 0 and amount > limit - state[unit] - state[unit + 3] then
        return i, unit, states
      end
    end
  end
  return nil, nil, states
end

sweep_expired(prefix, now_text, tonumber(sweep_max), ledger_max)
if live_reservation(prefix, request_id, now, ledger_max) then
  return {-1}
end
local refused_line, refused_unit, states = first_excess()
if refused_line then
  local texts = {}
  for i, state in ipairs(states) do
    texts[i] = state_text(state)
  end
  return {0, refused_line, refused_unit, packed(texts)}
end

local latest, held, texts = 0, {}, {}
for i, counter in ipairs(counters) do
  local base = line_base(i)
  local expires_ms = values[base + 7]
  texts[i] = apply(counter, amounts_at(values, base), NOTHING, expires_ms, states[i])
  held[#held + 1] = counter
  held[#held + 1] = table.concat({values[base + 1], values[base + 2], values[base + 3], expires_ms}, ' ')
  latest = math.max(latest, tonumber(expires_ms))
end
call('HSET', KEYS[2], unpack(held))
call('PEXPIREAT', KEYS[2], int(latest))
call('ZADD', KEYS[1], lease_until, request_id)
return {1, 0, 0, packed(texts)}
