-- record: add spend without a reservation (journal replay), at most once per request id, with the
-- caller's ledger row.
-- KEYS: leases, reservation, spent marker, counter of each line (only budget counters get spend).
-- ARGV: prefix, request id, [now, ledger_max, row time_ms, then usd, tokens, requests, expires_ms of each
--       line], [row: JSON array (see append_request_row)].
-- Returns 1 recorded, 0 this request id already added its spend.
local prefix, request_id = ARGV[1], ARGV[2]
local values = cjson.decode(ARGV[3])
local now, ledger_max = values[1], values[2]
if call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local live = live_reservation(prefix, request_id, now, ledger_max)
if call('EXISTS', KEYS[3]) == 1 then  -- its lease had ended: the reservation just became its spend
  return 0
end
if live then
  close_reservation(prefix, request_id, live, {})
end

local latest = math.floor(now * 1000) + 86400000   -- a day, when no budget line says longer
for i = 4, #KEYS do
  local base = 3 + (i - 4) * 4
  if kind_of(prefix, KEYS[i]) == 'budget' then   -- rate windows and flights are not spend: past by now
    apply(KEYS[i], NOTHING, amounts_at(values, base), values[base + 4])
    latest = math.max(latest, values[base + 4])
  end
end
mark_spent(prefix, request_id, latest)
append_request_row(prefix, ledger_max, values[3], 4)
return 1
