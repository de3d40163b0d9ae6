-- release: the live reservation leaves `reserved` without any spend; the caller's ledger row is added.
-- KEYS: leases, reservation.  ARGV: prefix, request id, [now, ledger_max, row time_ms],
--       [row: JSON array (see append_request_row)].
-- Returns 1 released, 0 no live reservation.
local prefix, request_id = ARGV[1], ARGV[2]
local now, ledger_max, row_ms = unpack(cjson.decode(ARGV[3]))
local lines = live_reservation(prefix, request_id, now, ledger_max)
if not lines then
  return 0
end
close_reservation(prefix, request_id, lines, {})
append_request_row(prefix, ledger_max, row_ms, 4)
return 1
