-- wrk script: POST /search with request bodies taken in turn from a file (one JSON body per line).
-- wrk -t2 -c8 -d30s -s benchmarks/search.lua http://127.0.0.1:8000 -- bodies.jsonl [api-key]
local bodies = {}
local next_body = 1

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  -- Threads start at different places so that they do not send the same query at once.
  next_body = (math.random(#bodies) - 1) % #bodies + 1
  wrk.method = "POST"
  wrk.path = "/search"
  wrk.headers["Content-Type"] = "application/json"
  if args[2] and #args[2] > 0 then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end

function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "qps": %.1f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f, ' ..
    '"max_ms": %.2f, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, e.connect, e.read, e.write, e.status, e.timeout))
end
