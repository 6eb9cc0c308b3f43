-- wrk script for bench/datapath.py: POSTs one prebuilt multipart body on every request.
--   [DATAPATH_HOSTS=host:port,host:port] wrk ... -s bench/datapath_wrk.lua URL -- BODY_FILE CONTENT_TYPE
-- DATAPATH_HOSTS sends each wrk thread's connections to one of these addresses in turn (the
-- floor: straight to both engines) instead of URL's. Counts every answer that is not a 200
-- (wrk's own count skips 2xx and 3xx), and prints one line, "DATAPATH {json}", with the counts
-- and latency percentiles, in microseconds, over all threads.

local threads = {}
local hosts = {}
for host, port in (os.getenv("DATAPATH_HOSTS") or ""):gmatch("([^,]+):(%d+)") do
  hosts[#hosts + 1] = {host, port}
end

function setup(thread)
  if #hosts > 0 then
    local host = hosts[#threads % #hosts + 1]
    thread.addr = wrk.lookup(host[1], host[2])[1]
  end
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = args[2]
  local authorization = os.getenv("DATAPATH_AUTHORIZATION") or ""
  if #authorization > 0 then wrk.headers["Authorization"] = authorization end
  responses, non200 = 0, 0
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then non200 = non200 + 1 end
end

function done(summary, latency, requests)
  local total, bad = 0, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("responses")
    bad = bad + thread:get("non200")
  end
  local e = summary.errors
  io.write(string.format(
    'DATAPATH {"requests":%d,"duration_us":%d,"responses":%d,"non200":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, total, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
