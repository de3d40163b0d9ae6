-- file_row: a ledger row that moves no counter (a request answered from the response cache).
-- KEYS: ledger.  ARGV: prefix, [ledger_max, row time_ms], row: JSON array (see append_request_row).
-- Returns 1.
local prefix = ARGV[1]
local ledger_max, row_ms = unpack(cjson.decode(ARGV[2]))
append_request_row(prefix, ledger_max, row_ms, 3)
return 1
