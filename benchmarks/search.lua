-- wrk script: POST /search with request bodies taken in turn from a file (one JSON body per line).
-- wrk -t2 -c8 -d30s -s benchmarks/search.lua http://127.0.0.1:8000 -- bodies.jsonl [api-key] [once THREADS]
-- "once": each body is sent at most once (of THREADS threads, each takes every THREADS-th line); a
-- thread stops when its lines run out, so no query repeats within the run.
-- Answers are counted by the db generation that gave them ("generation" ends each /search answer).
local bodies = {}
local next_body = 1
local once = false
local threads = 0
local started = {}
generations = {}

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
  table.insert(started, thread)
end

function response(status, headers, body)
  if status == 200 then
    local g = body:match('"generation":(%d+)}%s*$')
    if g then
      generations[g] = (generations[g] or 0) + 1
    end
  end
end

function init(args)
  once = args[3] == "once"
  local id = tonumber(wrk.thread:get("id")) or 0
  local count = tonumber(args[4]) or 1
  local n = 0
  for line in io.lines(args[1]) do
    if not once or n % count == id then
      bodies[#bodies + 1] = line
    end
    n = n + 1
  end
  if not once then
    -- Threads start at different places so that they do not send the same query at once.
    next_body = (math.random(#bodies) - 1) % #bodies + 1
  end
  wrk.method = "POST"
  wrk.path = "/search"
  wrk.headers["Content-Type"] = "application/json"
  if args[2] and #args[2] > 0 then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end

function request()
  local body = bodies[next_body]
  if once and next_body >= #bodies then
    wrk.thread:stop()
  end
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local counts = {}
  for _, thread in ipairs(started) do
    for g, n in pairs(thread:get("generations") or {}) do
      counts[g] = (counts[g] or 0) + n
    end
  end
  local parts = {}
  for g, n in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', g, n))
  end
  table.sort(parts)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "qps": %.1f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f, ' ..
    '"max_ms": %.2f, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"generations": {%s}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ", ")))
end
