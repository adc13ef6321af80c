-- Claims the request KEYS[1] for one call: when nothing holds it, sets it to ARGV[1] (the
-- call's claim: its fingerprint and a token of its own) for ARGV[2] ms and returns nothing;
-- else returns what holds it (another call's claim, or a remembered outcome) and its time to
-- live in ms. One script, so no two replicas both claim a request.
local held = redis.call("GET", KEYS[1])
if held then
  return {held, redis.call("PTTL", KEYS[1])}
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return false
