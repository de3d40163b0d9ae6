-- ping: a script that only answers, so a health check takes the same path as every budget operation.
-- KEYS: leases (it routes the call to the budget keys' node).  ARGV: none.  Returns 1.
return 1
