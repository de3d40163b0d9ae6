-- reserve: all-or-nothing reservation of one request's worst case on every line.
-- KEYS: leases, reservation, counter of each line.
-- ARGV: prefix, request id, now, lease_until, sweep max, ledger max, then 7 per line:
--       usd, tokens, requests, usd limit, tokens limit, requests limit (-1 = unlimited), expires_ms.
-- Returns {1, 0, 0, states...} reserved, {0, line, unit, states...} refused, {-1} id already reserved.
local prefix, request_id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local counters = {unpack(KEYS, 3)}

local function line_base(i)
  return 6 + (i - 1) * 7
end

-- The first line and unit where spent + reserved + amount would pass the limit; nil when all fit.
-- (limit - spent - reserved keeps every intermediate value exact below 2^53.)
local function first_excess()
  for i, counter in ipairs(counters) do
    local base, state = line_base(i), counter_state(counter)
    for unit = 1, 3 do
      local amount, limit = tonumber(ARGV[base + unit]), tonumber(ARGV[base + 3 + unit])
      if limit >= 0 and amount > limit - state[unit] - state[unit + 3] then
        return i, unit
      end
    end
  end
  return nil
end

sweep_expired(prefix, ARGV[3], tonumber(ARGV[5]), ARGV[6])
if live_reservation(prefix, request_id, now, ARGV[6]) then
  return {-1}
end
local refused_line, refused_unit = first_excess()
if refused_line then
  return append_states({0, refused_line, refused_unit}, counters)
end

local latest = 0
for i, counter in ipairs(counters) do
  local base = line_base(i)
  local expires_ms = ARGV[base + 7]
  apply(counter, amounts_at(base), NOTHING, expires_ms)
  local stored = table.concat({ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], expires_ms}, ' ')
  redis.call('HSET', KEYS[2], counter, stored)
  latest = math.max(latest, tonumber(expires_ms))
end
redis.call('PEXPIREAT', KEYS[2], int(latest))
redis.call('ZADD', KEYS[1], ARGV[4], request_id)
return append_states({1, 0, 0}, counters)
