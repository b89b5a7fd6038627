-- Gives back the holds and image slots whose lease ended on Redis's clock (a replica died or
-- lost the settlement): bounded work per call, the caller repeats while it returns `limit`.
-- KEYS[1] holds index (zset)   KEYS[2] image slots (zset)   KEYS[3] image count (hash)
-- ARGV[1] limit   ARGV[2] the tenant's key prefix ('tp:{acme}:')
-- Returns { holds given back, image slots given back }.
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local limit = tonumber(ARGV[1])
local holds = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)) do
  local hkey = ARGV[2] .. 'h:' .. id
  local h = redis.call('HMGET', hkey, 'pkg', 'pts')
  if h[1] then
    redis.call('HINCRBY', h[1], 'held', -tonumber(h[2]))
    redis.call('DEL', hkey)
  end
  redis.call('ZREM', KEYS[1], id)
  holds = holds + 1
end
local slots = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HINCRBY', KEYS[3], 'held', -1)
  slots = slots + 1
end
return { holds, slots }
