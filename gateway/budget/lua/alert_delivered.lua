-- alert_delivered: mark one budget alert delivered, so no claim succeeds again before it expires.
-- KEYS: the alert's hash, the alert leases zset.  ARGV: the alert key.  Returns 1.
if call('TYPE', KEYS[1]).ok == 'hash' then
  call('HSET', KEYS[1], 'done', '1')
  call('HDEL', KEYS[1], 'payload')
end
call('ZREM', KEYS[2], ARGV[1])
return 1
