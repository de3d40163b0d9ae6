-- read: the state of each counter, after turning ended leases into spend.
-- KEYS: leases, each counter.  ARGV: prefix, now, sweep max, ledger max.
-- Returns the six values of each counter in KEYS order (see FIELDS).
sweep_expired(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4])
return append_states({}, {unpack(KEYS, 2)})
