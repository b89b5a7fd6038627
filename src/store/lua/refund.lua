-- Gives back the token an admission of the same shape took (a 402/409/413 after admission):
-- GCRA's theoretical arrival time moves back one emission interval. A bucket of another shape
-- (the limit changed since) never held the token; no bucket is a full one.
-- Once per refund id: the client may send the command again when its answer was lost (a retry
-- on a broken connection), and the second one must not give a second token back. The marker
-- is set first, whatever the bucket's state, so a retry always answers 0.
-- KEYS[1] bucket   KEYS[2] the refund's marker (string, TTL)
-- ARGV[1] t (µs)   ARGV[2] shape   ARGV[3] marker TTL (ms)
-- Returns 1 when a token went back now, else 0.
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return 0
end
local v = redis.call('HMGET', KEYS[1], 'tat', 'shape')
local tat = tonumber(v[1])
if tat == nil or v[2] ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat - tonumber(ARGV[1])))
return 1
