-- read: the state of each counter, after turning ended leases into spend.
-- KEYS: leases, each counter.  ARGV: prefix, [now, sweep_max, ledger_max, then bucket k and buckets per
-- window n of each counter (n 0: a budget counter, -1: requests in flight)].
-- Returns {states}: the six values of each counter in KEYS order (see FIELDS, append_states); a rate
-- window's use is its spent requests and tokens, requests in flight are reserved requests.
local values = cjson.decode(ARGV[2])
local now, sweep_max, ledger_max = values[1], values[2], values[3]
sweep_expired(ARGV[1], now, sweep_max, ledger_max)
local texts = {}
for i = 2, #KEYS do
  local k, n = values[2 * i], values[2 * i + 1]
  if n == 0 then
    texts[#texts + 1] = state_text(counter_state(KEYS[i]))
  elseif n < 0 then
    texts[#texts + 1] = {'0', '0', '0', '0', '0', int(tonumber(call('HGET', KEYS[i], 'n')) or 0)}
  else
    local used = window_use(KEYS[i], k, n)
    texts[#texts + 1] = {'0', int(used[2]), int(used[1]), '0', '0', '0'}
  end
end
return {packed(texts)}
