-- Ends the claim ARGV[1] on the request KEYS[1], if it still holds it (an expired claim may
-- have been taken by another call since): with the outcome ARGV[2] remembered for ARGV[3] ms,
-- or, when ARGV[2] is empty, by forgetting the request. Returns 1 when it held it, else 0.
if redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == "" then
  redis.call("DEL", KEYS[1])
else
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
end
return 1
