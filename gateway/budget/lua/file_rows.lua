-- file_rows: ledger rows that move no counter (requests answered from the response cache), in order.
-- KEYS: ledger.  ARGV: prefix, [ledger_max, then each row's time_ms], then each row: JSON array (see
-- append_request_row).
-- Returns 1.
local prefix = ARGV[1]
local values = cjson.decode(ARGV[2])
for i = 2, #values do
  append_request_row(prefix, values[1], values[i], i + 1)
end
return 1
