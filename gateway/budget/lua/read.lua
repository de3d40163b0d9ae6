-- read: the state of each counter, after turning ended leases into spend.
-- KEYS: leases, each counter.  ARGV: prefix, now, sweep max.
-- Returns the six values of each counter in KEYS order (see FIELDS).
sweep_expired(ARGV[1], ARGV[2], tonumber(ARGV[3]))
return append_states({}, {unpack(KEYS, 2)})
