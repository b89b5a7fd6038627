-- Gives back the token an admission of the same shape took (a 402/409/413 after admission):
-- GCRA's theoretical arrival time moves back one emission interval. A bucket of another shape
-- (the limit changed since) never held the token; no bucket is a full one.
-- KEYS[1] bucket   ARGV[1] t (µs)   ARGV[2] shape
local v = redis.call('HMGET', KEYS[1], 'tat', 'shape')
local tat = tonumber(v[1])
if tat == nil or v[2] ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat - tonumber(ARGV[1])))
return 1
