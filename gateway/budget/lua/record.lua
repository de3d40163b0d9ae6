-- record: add spend without a reservation (journal replay), at most once per request id, with the
-- caller's ledger row.
-- KEYS: leases, reservation, spent marker, counter of each line.
-- ARGV: prefix, request id, now, ledger max, then per line: usd, tokens, requests, expires_ms,
--       then [row time ms, row field/value pairs].
-- Returns 1 recorded, 0 this request id already added its spend.
local prefix, request_id, ledger_max = ARGV[1], ARGV[2], ARGV[4]
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local live = live_reservation(prefix, request_id, tonumber(ARGV[3]), ledger_max)
if redis.call('EXISTS', KEYS[3]) == 1 then  -- its lease had ended: the reservation just became its spend
  return 0
end
if live then
  close_reservation(prefix, request_id, live, {})
end

local latest = 0
for i = 4, #KEYS do
  local base = 4 + (i - 4) * 4
  apply(KEYS[i], NOTHING, amounts_at(base), ARGV[base + 4])
  latest = math.max(latest, tonumber(ARGV[base + 4]))
end
mark_spent(prefix, request_id, latest)
append_request_row(prefix, ledger_max, 4 + 4 * (#KEYS - 3) + 1)
return 1
