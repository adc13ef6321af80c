-- Empties the GCRA bucket KEYS[1] (emission interval ARGV[1] µs, burst ARGV[2] calls): its
-- theoretical arrival time becomes at least now + burst × interval, so its next call waits
-- one interval, as after a spent burst. Time from the server's clock, as in gcra.lua.
local now = redis.call("TIME")
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local empty = now + tonumber(ARGV[1]) * tonumber(ARGV[2])
local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < empty then
  redis.call("SET", KEYS[1], string.format("%d", empty), "PX", math.ceil((empty - now) / 1000))
end
return 0
