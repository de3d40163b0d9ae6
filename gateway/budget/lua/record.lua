-- record: add spend without a reservation (journal replay), at most once per request id.
-- KEYS: leases, reservation, spent marker, counter of each line.
-- ARGV: prefix, request id, now, then per line: usd, tokens, requests, expires_ms.
-- Returns 1 recorded, 0 this request id already added its spend.
local prefix, request_id = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local live = live_reservation(prefix, request_id, tonumber(ARGV[3]))
if redis.call('EXISTS', KEYS[3]) == 1 then  -- its lease had ended: the reservation just became its spend
  return 0
end
if live then
  close_reservation(prefix, request_id, live, {})
end

local latest = 0
for i = 4, #KEYS do
  local base = 3 + (i - 4) * 4
  apply(KEYS[i], NOTHING, amounts_at(base), ARGV[base + 4])
  latest = math.max(latest, tonumber(ARGV[base + 4]))
end
mark_spent(prefix, request_id, latest)
return 1
