-- Helpers shared by the budget scripts; prepended to each operation script when it is registered.
--
-- Arguments are few and compact (each one costs the gateway CPU to encode): a script's numbers travel as
-- ONE JSON array of decimal numbers, decoded in C by cjson (exact below 2^53, like every amount here).
-- Numbers written to Redis are formatted with `int` (and scores with `score`): never left to Lua's '%.14g'.
--
-- Keys (prefix = ARGV[1], e.g. "{gw}:"; the hash tag keeps every key on one Cluster slot):
--   <prefix>ctr:<policy>:<period>:<window>  hash of the six FIELDS below, PEXPIREAT its expiry
--   <prefix>resv:<request id>               hash: counter key -> "usd tokens requests expires_ms"
--   <prefix>leases                          zset: request id scored by lease end (epoch seconds)
--   <prefix>rate:<policy>:<per>:<each>:<epoch>  hash of one epoch of a sliding rate window (see
--                                           gateway/budget/rate_windows.py): r, t = requests and
--                                           tokens used in the epoch; r<j>, t<j> = in its bucket j
--   <prefix>conc:<policy>:<each>            hash n = requests in flight
--   <prefix>spent:<request id>              marker: spend recorded without a reservation (a journal
--                                           replay) or by an ended lease; settled requests leave none
--   <prefix>ledger                          stream: one row per request, trimmed to about ledger_max rows:
--                                           a field 'row' holding the gateway's JSON row; rows a script
--                                           files itself (lease_expired), and rows of earlier releases,
--                                           have one field per column
-- Amounts are integers below 2^53, exact in Lua's doubles; they reach Redis formatted with '%d'.

local call, concat, format, tonumber, unpack = redis.call, table.concat, string.format, tonumber, unpack
local FIELDS = {
  'spent_usd', 'spent_tokens', 'spent_requests', 'reserved_usd', 'reserved_tokens', 'reserved_requests',
}
local NOTHING = {0, 0, 0}

local function int(n)
  return format('%d', n)
end

local function negated(amounts)
  return {-amounts[1], -amounts[2], -amounts[3]}
end

-- A sorted-set score or bound (epoch seconds) to the microsecond.
local function score(seconds)
  return format('%.6f', seconds)
end

-- Three amounts (usd, tokens, requests) from values[base + 1 .. base + 3].
local function amounts_at(values, base)
  return {tonumber(values[base + 1]), tonumber(values[base + 2]), tonumber(values[base + 3])}
end

-- {spent usd, tokens, requests, reserved usd, tokens, requests} of one counter (0 when absent).
local function counter_state(counter)
  local values = call('HMGET', counter, unpack(FIELDS))
  local state = {}
  for i = 1, 6 do
    state[i] = tonumber(values[i]) or 0
  end
  return state
end

-- The six values of a state as decimal strings.
local function state_text(state)
  return {int(state[1]), int(state[2]), int(state[3]), int(state[4]), int(state[5]), int(state[6])}
end

-- ONE string: the six values of each state text, in order, space-separated (one string costs the caller
-- far less to receive than many integers).
local function packed(texts)
  local values = {}
  for _, text in ipairs(texts) do
    values[#values + 1] = concat(text, ' ')
  end
  return concat(values, ' ')
end

-- Appends to `out` the packed states of `counters`, read now.
local function append_states(out, counters)
  local texts = {}
  for i, counter in ipairs(counters) do
    texts[i] = state_text(counter_state(counter))
  end
  out[#out + 1] = packed(texts)
  return out
end

-- Adds deltas to a counter's state, writes all six values in one HSET and returns the new state's text.
-- The expiry is set when HSET created fields: every line of a window carries the same expiry, so an
-- existing counter already has it.
local function apply(counter, reserved_delta, spent_delta, expires_ms)
  local state = counter_state(counter)
  for i = 1, 3 do
    state[i] = state[i] + spent_delta[i]
    state[i + 3] = state[i + 3] + reserved_delta[i]
  end
  local text = state_text(state)
  local created = call('HSET', counter, FIELDS[1], text[1], FIELDS[2], text[2], FIELDS[3], text[3],
    FIELDS[4], text[4], FIELDS[5], text[5], FIELDS[6], text[6])
  if created > 0 then
    call('PEXPIREAT', counter, int(expires_ms))
  end
  return text
end

-- What a counter key counts: 'budget', 'rate' (a sliding window's epoch) or 'concurrent'.
local function kind_of(prefix, counter)
  local kind = string.sub(counter, #prefix + 1, #prefix + 5)
  if kind == 'rate:' then
    return 'rate'
  end
  return kind == 'conc:' and 'concurrent' or 'budget'
end

-- The key of the epoch before a rate epoch's (its number is the key's last part).
local function previous_epoch(counter, epoch)
  return string.match(counter, '^(.*:)%d+$') .. int(epoch - 1)
end

-- The sum of fields <unit><b> of a hash for buckets b = from .. to (0 when absent).
local function bucket_sum(key, unit, from, to)
  if to < from then
    return 0
  end
  local fields = {}
  for b = from, to do
    fields[#fields + 1] = unit .. b
  end
  local sum = 0
  for _, value in ipairs(call('HMGET', key, unpack(fields))) do
    sum = sum + (tonumber(value) or 0)
  end
  return sum
end

-- {requests, tokens} used in the sliding window at bucket k (buckets k - n .. k, n per epoch): the
-- current epoch, and the previous epoch's buckets from j on (the shorter way round).
local function window_use(counter, k, n)
  local epoch = math.floor(k / n)
  local j, prev = k - epoch * n, previous_epoch(counter, epoch)
  local used = call('HMGET', counter, 'r', 't')
  used = {tonumber(used[1]) or 0, tonumber(used[2]) or 0}
  if call('EXISTS', prev) == 0 then
    return used
  end
  for u, unit in ipairs({'r', 't'}) do
    if 2 * j > n then
      used[u] = used[u] + bucket_sum(prev, unit, j, n - 1)
    else
      used[u] = used[u] + (tonumber(call('HGET', prev, unit)) or 0) - bucket_sum(prev, unit, 0, j - 1)
    end
  end
  return used
end

-- Milliseconds from now_ms until `extra` more of unit u (1 requests, 2 tokens) fits in the window at
-- bucket k with limit `limit`: once enough of its oldest buckets have left it. -1 when it never fits.
local function window_wait(counter, k, n, bucket_ms, now_ms, u, extra, limit, used)
  if extra > limit then
    return -1
  end
  local epoch = math.floor(k / n)
  local j, prev, unit = k - epoch * n, previous_epoch(counter, epoch), u == 1 and 'r' or 't'
  local need, freed = used + extra - limit, 0
  for b = k - n, k do
    local key, field = prev, b - (epoch - 1) * n
    if b >= epoch * n then
      key, field = counter, b - epoch * n
    end
    freed = freed + (tonumber(call('HGET', key, unit .. field)) or 0)
    if freed >= need then
      return math.max(1, (b + n + 1) * bucket_ms - now_ms)
    end
  end
  return (k + n + 1) * bucket_ms - now_ms   -- what is counted sits in buckets ahead of this clock
end

-- Adds deltas {requests, tokens} to bucket j of a rate epoch, unless the epoch has expired (a request
-- that outlived its window: nothing is left to correct).
local function add_to_bucket(counter, j, requests, tokens)
  if (requests == 0 and tokens == 0) or call('EXISTS', counter) == 0 then
    return
  end
  if requests ~= 0 then
    call('HINCRBY', counter, 'r' .. j, int(requests))
    call('HINCRBY', counter, 'r', int(requests))
  end
  if tokens ~= 0 then
    call('HINCRBY', counter, 't' .. j, int(tokens))
    call('HINCRBY', counter, 't', int(tokens))
  end
end

-- Frees `count` requests in flight (never below zero; nothing when the counter expired).
local function leave_flight(counter, count)
  local held = tonumber(call('HGET', counter, 'n'))
  if held then
    call('HSET', counter, 'n', int(math.max(0, held - count)))
  end
end

local function reservation_lines(prefix, request_id)
  local flat = call('HGETALL', prefix .. 'resv:' .. request_id)
  local lines = {}
  for i = 1, #flat, 2 do
    local usd, tokens, requests, expires_ms, bucket = string.match(flat[i + 1],
      '^(%d+) (%d+) (%d+) (%d+) ?(%d*)$')
    lines[#lines + 1] = {
      counter = flat[i],
      kind = kind_of(prefix, flat[i]),
      amounts = {tonumber(usd), tonumber(tokens), tonumber(requests)},
      expires_ms = expires_ms,
      bucket = tonumber(bucket),
    }
  end
  return lines
end

local function latest_expiry_ms(lines)
  local latest = 0
  for _, line in ipairs(lines) do
    latest = math.max(latest, tonumber(line.expires_ms))
  end
  return latest
end

-- Appends one row (a flat list of field, value pairs) to the ledger, filed at time_ms. Rows stay in
-- order: a row older than the last one (a lagging replica clock, a journal replay) is filed at the last
-- row's time. Redis 7 numbers the row itself ('<ms>-*'); where it cannot, the id is worked out here.
local function append_ledger(prefix, ledger_max, time_ms, fields)
  local ledger, max_rows = prefix .. 'ledger', int(ledger_max)
  local added = redis.pcall('XADD', ledger, 'MAXLEN', '~', max_rows, int(time_ms) .. '-*', unpack(fields))
  if type(added) ~= 'table' or not added.err then
    return
  end
  local id = int(time_ms) .. '-0'
  local last = call('XREVRANGE', ledger, '+', '-', 'COUNT', 1)[1]
  if last then
    local ms, seq = string.match(last[1], '^(%d+)-(%d+)$')
    if tonumber(ms) >= time_ms then
      id = ms .. '-' .. int(tonumber(seq) + 1)
    end
  end
  call('XADD', ledger, 'MAXLEN', '~', max_rows, id, unpack(fields))
end

-- Appends the caller's row when it sent one, filed at time_ms: ARGV[at] is a JSON array of the
-- LedgerEntry fields after its time, stored as it came (decoding and re-encoding it here would cost
-- Redis more than the rest of a settle's ledger work).
local function append_request_row(prefix, ledger_max, time_ms, at)
  if #ARGV >= at then
    append_ledger(prefix, ledger_max, time_ms, {'row', ARGV[at]})
  end
end

-- The row of a reservation whose lease ended: its policies and, per unit, its largest budget line amount.
local function expired_row(request_id, lines)
  local policies, seen, most = {}, {}, {0, 0, 0}
  for _, line in ipairs(lines) do
    local policy = line.kind == 'budget' and string.match(line.counter, 'ctr:([^:]+):[^:]+:[^:]+$')
    if policy and not seen[policy] then
      seen[policy] = true
      policies[#policies + 1] = policy
    end
    if line.kind == 'budget' then
      for i = 1, 3 do
        most[i] = math.max(most[i], line.amounts[i])
      end
    end
  end
  table.sort(policies)
  return {
    'id', request_id, 'caller', '', 'team', '', 'policies', table.concat(policies, ','), 'model', '',
    'provider', '', 'prompt', int(most[2]), 'completion', '0', 'cached', '0', 'cost', int(most[1]),
    'status', 'lease_expired', 'latency_ms', '0', 'attempts', '0',
  }
end

local function mark_spent(prefix, request_id, expires_ms)
  call('SET', prefix .. 'spent:' .. request_id, '1', 'PXAT', int(expires_ms))
end

local ZERO_STATE = {'0', '0', '0', '0', '0', '0'}

-- Removes a reservation: its amounts leave `reserved`; spend[counter] (if any) is added to `spent`. A
-- rate line's bucket keeps spend[counter] instead of its amount; an in-flight line leaves the flight.
-- Returns the new state text of each of its counters, by counter key (zeros for rate and in-flight).
local function close_reservation(prefix, request_id, lines, spend)
  local states = {}
  for _, line in ipairs(lines) do
    local spent = spend[line.counter] or NOTHING
    if line.kind == 'budget' then
      states[line.counter] = apply(line.counter, negated(line.amounts), spent, line.expires_ms)
    else
      if line.kind == 'rate' then
        add_to_bucket(line.counter, line.bucket, spent[3] - line.amounts[3], spent[2] - line.amounts[2])
      else
        leave_flight(line.counter, line.amounts[3])
      end
      states[line.counter] = ZERO_STATE
    end
  end
  call('DEL', prefix .. 'resv:' .. request_id)
  call('ZREM', prefix .. 'leases', request_id)
  return states
end

-- A reservation whose lease ended becomes spend of its full reserved amounts, with a ledger row.
local function expire_into_spend(prefix, request_id, lines, now, ledger_max)
  local spend = {}
  for _, line in ipairs(lines) do
    spend[line.counter] = line.amounts
  end
  close_reservation(prefix, request_id, lines, spend)
  local budget = {}
  for _, line in ipairs(lines) do
    if line.kind == 'budget' then
      budget[#budget + 1] = line
    end
  end
  if #budget > 0 then
    mark_spent(prefix, request_id, latest_expiry_ms(budget))
    append_ledger(prefix, ledger_max, math.floor(now * 1000 + 0.5), expired_row(request_id, lines))
  end
end

-- The lines of request_id's reservation while its lease runs; nil when there is none or it ended
-- (an ended one is turned into spend first).
local function live_reservation(prefix, request_id, now, ledger_max)
  local lease = call('ZSCORE', prefix .. 'leases', request_id)
  if not lease then
    return nil
  end
  local lines = reservation_lines(prefix, request_id)
  if tonumber(lease) < now or #lines == 0 then
    expire_into_spend(prefix, request_id, lines, now, ledger_max)
    return nil
  end
  return lines
end

-- Turns up to max_count reservations whose lease ended before now into spend.
local function sweep_expired(prefix, now, max_count, ledger_max)
  local ended = call('ZRANGEBYSCORE', prefix .. 'leases', '-inf', '(' .. score(now), 'LIMIT', 0, int(max_count))
  for _, request_id in ipairs(ended) do
    expire_into_spend(prefix, request_id, reservation_lines(prefix, request_id), now, ledger_max)
  end
end
