-- Holds one image slot for an Image Search add in flight (SPEC §4: capacity 409), with a lease.
-- KEYS[1] image count (hash: count, held)   KEYS[2] image slots (zset)
-- ARGV[1] capacity   ARGV[2] id   ARGV[3] lease (ms)
-- Returns 1 when held (or already held by this id), 0 when the instance is full.
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return 1
end
local v = redis.call('HMGET', KEYS[1], 'count', 'held')
local count = tonumber(v[1]) or 0
local held = tonumber(v[2]) or 0
if count + held >= tonumber(ARGV[1]) then
  return 0
end
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HINCRBY', KEYS[1], 'held', 1)
redis.call('ZADD', KEYS[2], string.format('%.0f', now_ms + tonumber(ARGV[3])), ARGV[2])
return 1
