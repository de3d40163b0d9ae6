-- settle: the live reservation leaves `reserved`; the actual usage is added to `spent`; the caller's
-- ledger row is added.
-- KEYS: leases, reservation, spent marker, each counter with actual usage.
-- ARGV: prefix, request id, now, ledger max, then per counter: usd, tokens, requests,
--       then [row time ms, row field/value pairs].
-- Returns {1, states of the counters...} settled, {0} no live reservation, {-1} a counter outside the
-- reservation (nothing changed).
local prefix, request_id, ledger_max = ARGV[1], ARGV[2], ARGV[4]
local lines = live_reservation(prefix, request_id, tonumber(ARGV[3]), ledger_max)
if not lines then
  return {0}
end

local reserved = {}
for _, line in ipairs(lines) do
  reserved[line.counter] = true
end
local spend = {}
for i = 4, #KEYS do
  if not reserved[KEYS[i]] then
    return {-1}
  end
  local base = 4 + (i - 4) * 3
  spend[KEYS[i]] = amounts_at(base)
end
close_reservation(prefix, request_id, lines, spend)
mark_spent(prefix, request_id, latest_expiry_ms(lines))
append_request_row(prefix, ledger_max, 4 + 3 * (#KEYS - 3) + 1)
return append_states({1}, {unpack(KEYS, 4)})
