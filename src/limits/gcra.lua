-- GCRA for each key in KEYS, in order, atomically; time from the server's clock (TIME), so
-- replicas' clocks do not matter. ARGV holds, per key, its emission interval and its burst
-- (in microseconds and calls). A key refusing stops the walk: the keys before it stay charged
-- (a call charges every limiter it reaches that admits it), it and those after are untouched.
-- Returns {0, 0} when every key admits, else {index of the refusing key, µs until a call
-- would pass}. Each key expires when its bucket is full again.
local now = redis.call("TIME")
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = interval * tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call("GET", key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  if new_tat - now > tolerance then
    return {i, new_tat - now - tolerance}
  end
  redis.call("SET", key, string.format("%d", new_tat), "PX", math.ceil((new_tat - now) / 1000))
end
return {0, 0}
