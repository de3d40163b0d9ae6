-- settle: the live reservation leaves `reserved`; the actual usage is added to `spent`; the caller's
-- ledger row is added. Nothing about the request is left behind but its ledger row: a settle sent again
-- (a journal replay of one whose reply was lost) finds no live reservation and changes nothing.
-- KEYS: leases, reservation, each counter with actual usage.
-- ARGV: prefix, request id, [now, ledger_max, row time_ms, then usd, tokens, requests of each counter],
--       [row: JSON array (see append_request_row)].
-- Returns {1, states of the counters (see append_states)} settled, {0} no live reservation, {-1} a counter outside the
-- reservation (nothing changed).
local prefix, request_id = ARGV[1], ARGV[2]
local values = cjson.decode(ARGV[3])
local now, ledger_max = values[1], values[2]
local lines = live_reservation(prefix, request_id, now, ledger_max)
if not lines then
  return {0}
end

local reserved = {}
for _, line in ipairs(lines) do
  reserved[line.counter] = true
end
local spend = {}
for i = 3, #KEYS do
  if not reserved[KEYS[i]] then
    return {-1}
  end
  spend[KEYS[i]] = amounts_at(values, 3 + (i - 3) * 3)
end
local texts = close_reservation(prefix, request_id, lines, spend)
append_request_row(prefix, ledger_max, values[3], 4)
local settled = {}
for i = 3, #KEYS do
  settled[#settled + 1] = texts[KEYS[i]]
end
return {1, packed(settled)}
