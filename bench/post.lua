-- wrk script of bench/bench.py: POST one JSON body to the target, then print one result line.
--
-- Environment: BENCH_BODY      path of the request body (JSON)
--              BENCH_HEADERS   extra request headers, one "Name: value" per line (optional)
--              BENCH_UNIQUE    a run id (fixed width): every request's user message starts with it and the
--                              request's number instead of its first characters, so no two bodies are
--                              alike (a cache never hits) and each costs what the body file costs
--              BENCH_ACTIVE_S  send new requests only during the first BENCH_ACTIVE_S seconds (optional);
--                              wrk's -d must be longer: in the rest of the run the requests in flight
--                              finish and are counted, so no request is cut off when wrk stops
-- Output (stdout, last line): BENCH_RESULT {...} with completed requests, error counts and
-- latency percentiles in microseconds, for bench.py to parse instead of wrk's text report.

local function read_file(path)
  local file = assert(io.open(path, "rb"), "cannot open BENCH_BODY " .. tostring(path))
  local data = file:read("*a")
  file:close()
  return data
end

wrk.method = "POST"
wrk.body = read_file(os.getenv("BENCH_BODY"))
wrk.headers["Content-Type"] = "application/json"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^%s*([^:]-)%s*:%s*(.-)%s*$")
  if name and name ~= "" then
    wrk.headers[name] = value
  end
end

local unique = os.getenv("BENCH_UNIQUE")
if unique and unique ~= "" then
  local head, tail = wrk.body:match('^(.-"role": "user", "content": ")(.*)$')
  assert(head, "BENCH_UNIQUE: the body has no user message")
  local sent = 0
  function request()
    sent = sent + 1
    local marker = string.format("%s%010d", unique, sent)
    return wrk.format(nil, nil, nil, head .. marker .. tail:sub(#marker + 1))
  end
end

local active_s = tonumber(os.getenv("BENCH_ACTIVE_S") or "")
if active_s then
  local ffi = require("ffi")             -- wrk runs LuaJIT; os.time() has one-second steps
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock_id, bench_timespec *tp);
  ]]
  local now_ts = ffi.new("bench_timespec")
  local function now()
    ffi.C.clock_gettime(1, now_ts)       -- CLOCK_MONOTONIC
    return tonumber(now_ts.tv_sec) + tonumber(now_ts.tv_nsec) / 1e9
  end
  local stop_at = nil

  function delay()                       -- ms before each request: none while active, then "never"
    stop_at = stop_at or now() + active_s
    if now() < stop_at then
      return 0
    end
    return 3600000
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.status,
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
