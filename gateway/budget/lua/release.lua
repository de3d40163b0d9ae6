-- release: the live reservation leaves `reserved` without any spend; the caller's ledger row is added.
-- KEYS: leases, reservation.  ARGV: prefix, request id, now, ledger max, [row time ms, row field/value pairs].
-- Returns 1 released, 0 no live reservation.
local prefix, request_id, ledger_max = ARGV[1], ARGV[2], ARGV[4]
local lines = live_reservation(prefix, request_id, tonumber(ARGV[3]), ledger_max)
if not lines then
  return 0
end
close_reservation(prefix, request_id, lines, {})
append_request_row(prefix, ledger_max, 5)
return 1
