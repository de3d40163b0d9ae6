-- settle: the live reservation leaves `reserved`; the actual usage is added to `spent`.
-- KEYS: leases, reservation, spent marker, each counter with actual usage.
-- ARGV: prefix, request id, now, then per counter: usd, tokens, requests.
-- Returns 1 settled, 0 no live reservation, -1 a counter outside the reservation (nothing changed).
local prefix, request_id = ARGV[1], ARGV[2]
local lines = live_reservation(prefix, request_id, tonumber(ARGV[3]))
if not lines then
  return 0
end

local reserved = {}
for _, line in ipairs(lines) do
  reserved[line.counter] = true
end
local spend = {}
for i = 4, #KEYS do
  if not reserved[KEYS[i]] then
    return -1
  end
  local base = 3 + (i - 4) * 3
  spend[KEYS[i]] = amounts_at(base)
end
close_reservation(prefix, request_id, lines, spend)
mark_spent(prefix, request_id, latest_expiry_ms(lines))
return 1
