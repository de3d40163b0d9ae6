-- reserve: all-or-nothing reservation of one worst case, under one request id or under several spare
-- ids at once (each id holds the same lines).
-- KEYS: leases, the reservation of each id, counter of each line.
-- ARGV: prefix, first id, [now, lease_until, sweep_max, ledger_max, room, need_group, then 11 numbers per
--       line: usd, tokens, requests, usd limit, tokens limit, requests limit (-1 = unlimited), expires_ms,
--       bucket k, buckets per window n (0: a budget counter, -1: requests in flight), bucket_ms, group],
--       further ids.
-- Refused unless (ids + room - 1) x each amount fits (one id, room 1: the amount itself). Lines of a group
-- g > 0 are reserved only when all of that group's lines fit; with need_group 1 a request none of whose
-- groups fit is refused.
-- Returns {1} reserved (with rate lines or groups: {1, skipped groups, used}, each a string of numbers:
-- the groups not reserved, then each group-0 rate line's requests and tokens used, this reservation
-- included), {0, line, unit, held, retry_ms[, used]} refused by that line and unit (nothing changed), {-1} an
-- id already reserved. held 0: that amount alone does not fit beside the spend (reported before any line
-- that is only busy); held 1: every amount fits beside the spend, reservations in flight hold the room.
-- retry_ms: a rate window's wait until the request fits (-1 never), else 0; used: what that window holds.
local prefix = ARGV[1]
local ids = {ARGV[2], unpack(ARGV, 4)}
local values = cjson.decode(ARGV[3])
local now, lease_until, sweep_max, ledger_max, room = values[1], values[2], values[3], values[4], values[5]
local need_group = values[6]
local first = 2 + #ids        -- KEYS index of the first counter
local STRIDE = 11

sweep_expired(prefix, now, sweep_max, ledger_max)
for _, id in ipairs(ids) do
  if live_reservation(prefix, id, now, ledger_max) then
    return {-1}
  end
end

-- Every counter is read and checked before any is written. (limit - spent - reserved keeps every value
-- exact below 2^53.) A refusal of a group line only drops its group.
local states, times, busy = {}, #ids + room - 1, nil
local dropped, group_refusal, groups, fitting = {}, nil, 0, 0
for i = first, #KEYS do
  local base = 6 + (i - first) * STRIDE
  local n, group, refusal = values[base + 9], values[base + 11], nil
  if n == 0 then
    local state = counter_state(KEYS[i])
    for unit = 1, 3 do
      local limit, amount = values[base + 3 + unit], values[base + unit]
      if limit >= 0 then
        if amount > limit - state[unit] then
          refusal = refusal or {0, i - first + 1, unit, 0, 0}
        end
        if not busy and times * amount > limit - state[unit] - state[unit + 3] then
          busy = {0, i - first + 1, unit, 1, 0}
        end
      end
    end
    states[i] = state
  elseif n < 0 then
    local held, limit = tonumber(call('HGET', KEYS[i], 'n')) or 0, values[base + 6]
    if limit >= 0 and times * values[base + 3] > limit - held then
      refusal = {0, i - first + 1, 3, 0, 0}
    end
  else
    local used, k = window_use(KEYS[i], values[base + 8], n), values[base + 8]
    local wait = nil
    for u, unit in ipairs({3, 2}) do
      local limit, amount = values[base + 3 + unit], values[base + unit]
      if limit >= 0 and times * amount > limit - used[u] then
        local unit_wait = window_wait(KEYS[i], k, n, values[base + 10], math.floor(now * 1000), u,
          times * amount, limit, used[u])
        if not wait or unit_wait < 0 or (wait >= 0 and unit_wait > wait) then
          wait = unit_wait
          refusal = {0, i - first + 1, unit, 0, unit_wait, used[u]}
        end
      end
    end
    states[i] = used
  end
  if group > 0 then
    if not dropped[group] and refusal then
      dropped[group] = true
      if not group_refusal or (refusal[5] >= 0 and (group_refusal[5] < 0 or refusal[5] < group_refusal[5])) then
        group_refusal = refusal
      end
    end
  elseif refusal then
    return refusal
  end
end
local seen = {}
for i = first, #KEYS do
  local group = values[6 + (i - first) * STRIDE + 11]
  if group > 0 and not seen[group] then
    seen[group] = true
    groups = groups + 1
    fitting = fitting + (dropped[group] and 0 or 1)
  end
end
if need_group == 1 and groups > 0 and fitting == 0 then
  return group_refusal
end
if busy then
  return busy
end

-- A budget line changes only its reserved fields (a counter that had none is new and gets its expiry);
-- a rate line adds to its bucket, an in-flight line to its flight.
local held, latest, used, skipped = {}, math.floor(lease_until * 1000), {}, {}
for i = first, #KEYS do
  local counter, base = KEYS[i], 6 + (i - first) * STRIDE
  local usd, tokens, requests, expires_ms = values[base + 1], values[base + 2], values[base + 3], values[base + 7]
  local k, n, group = values[base + 8], values[base + 9], values[base + 11]
  local bucket = ''
  if dropped[group] then
    -- not reserved: its group does not fit
  elseif n == 0 then
    local state = states[i]
    local created = call('HSET', counter, 'reserved_usd', int(state[4] + #ids * usd),
      'reserved_tokens', int(state[5] + #ids * tokens), 'reserved_requests', int(state[6] + #ids * requests))
    if created > 0 then
      call('PEXPIREAT', counter, int(expires_ms))
    end
  elseif n < 0 then
    call('HINCRBY', counter, 'n', int(#ids * requests))
    call('PEXPIREAT', counter, int(expires_ms))
  else
    local j = k - math.floor(k / n) * n
    local fresh = call('EXISTS', counter) == 0
    call('HINCRBY', counter, 'r' .. j, int(#ids * requests))
    call('HINCRBY', counter, 'r', int(#ids * requests))
    call('HINCRBY', counter, 't' .. j, int(#ids * tokens))
    call('HINCRBY', counter, 't', int(#ids * tokens))
    if fresh then
      call('PEXPIREAT', counter, int(expires_ms))
    end
    bucket = ' ' .. int(j)
    if group == 0 then
      used[#used + 1] = int(states[i][1] + #ids * requests)
      used[#used + 1] = int(states[i][2] + #ids * tokens)
    end
  end
  if not dropped[group] then
    held[#held + 1] = counter
    held[#held + 1] = format('%d %d %d %d', usd, tokens, requests, expires_ms) .. bucket
    latest = math.max(latest, expires_ms)
  end
end
for group in pairs(dropped) do
  skipped[#skipped + 1] = int(group)
end
local leases, lease = {}, score(lease_until)
if #held > 0 then
  for k, id in ipairs(ids) do
    call('HSET', KEYS[1 + k], unpack(held))
    call('PEXPIREAT', KEYS[1 + k], int(latest))
    leases[#leases + 1] = lease
    leases[#leases + 1] = id
  end
  call('ZADD', KEYS[1], unpack(leases))
end
if #used > 0 or groups > 0 then
  return {1, concat(skipped, ' '), concat(used, ' ')}
end
return {1}
