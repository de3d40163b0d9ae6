-- read: the state of each counter, after turning ended leases into spend.
-- KEYS: leases, each counter.  ARGV: prefix, [now, sweep_max, ledger_max].
-- Returns {states}: the six values of each counter in KEYS order (see FIELDS, append_states).
local now, sweep_max, ledger_max = unpack(cjson.decode(ARGV[2]))
sweep_expired(ARGV[1], now, sweep_max, ledger_max)
return append_states({}, {unpack(KEYS, 2)})
