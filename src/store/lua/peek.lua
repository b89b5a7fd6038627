-- Reads a GCRA bucket without taking a token: the rate-limit fields of a refusal decided
-- before admission (SPEC §4) show the bucket as it is. Writes nothing.
-- KEYS[1] bucket (hash: tat µs, shape)   ARGV[1] shape (`limit:depth`)
-- Returns { tat µs (0: no bucket of this shape, which is a full one), now µs }.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local v = redis.call('HMGET', KEYS[1], 'tat', 'shape')
local tat = tonumber(v[1])
if tat == nil or v[2] ~= ARGV[1] then
  tat = 0
end
return { tat, now }
