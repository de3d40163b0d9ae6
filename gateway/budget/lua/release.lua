-- release: the live reservation leaves `reserved` without any spend.
-- KEYS: leases, reservation.  ARGV: prefix, request id, now.
-- Returns 1 released, 0 no live reservation.
local prefix, request_id = ARGV[1], ARGV[2]
local lines = live_reservation(prefix, request_id, tonumber(ARGV[3]))
if not lines then
  return 0
end
close_reservation(prefix, request_id, lines, {})
return 1
