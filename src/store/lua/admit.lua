-- Admission in one round trip (SPEC §5.4, §6, §11.1–2): a GCRA bucket on Redis TIME with
-- governor's maths, then optionally the package hold of the call.
--
-- KEYS[1] bucket (hash: tat µs, shape)     KEYS[2] holds index (zset: id -> lease end, ms)
-- KEYS[3] hold (hash: pkg, pid, pts, idx)   KEYS[4..] candidate packages (hash: consumed, held)
-- ARGV[1] t (µs per token; 0 = no bucket)  ARGV[2] tau = t × (depth − 1)  ARGV[3] shape
-- ARGV[4] want (micro-points; 0 = no hold)  ARGV[5] lease (ms)  ARGV[6] id
-- ARGV[7] 1 = give the token back when no candidate can hold `want` (a 402 follows)
-- ARGV[8..] per candidate: points, then package id
-- Returns { admitted (1/0), retry µs when throttled else tat µs, now µs, hold index (-1 none) }.
local function fmt(n) return string.format('%.0f', n) end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local t = tonumber(ARGV[1])
local want = tonumber(ARGV[4])

local tat = 0
local old_tat = nil
if t > 0 then
  local tau = tonumber(ARGV[2])
  local v = redis.call('HMGET', KEYS[1], 'tat', 'shape')
  old_tat = tonumber(v[1])
  local cur = old_tat
  if cur == nil or v[2] ~= ARGV[3] then cur = now; old_tat = nil end
  if now < cur - tau then
    return { 0, cur - tau - now, now, -1 }
  end
  tat = math.max(cur, now) + t
  redis.call('HSET', KEYS[1], 'tat', fmt(tat), 'shape', ARGV[3])
  -- Past its tat the bucket is full, the same as no key: let idle buckets go.
  redis.call('PEXPIREAT', KEYS[1], fmt(math.ceil(tat / 1000) + 1000))
end

if want <= 0 then
  return { 1, tat, now, -1 }
end

-- An existing hold of this id (a retried call): the same answer.
local held_idx = redis.call('HGET', KEYS[3], 'idx')
if held_idx then
  return { 1, tat, now, tonumber(held_idx) }
end

local n = #KEYS - 3
for i = 1, n do
  local pkey = KEYS[3 + i]
  local points = tonumber(ARGV[6 + 2 * i])
  local v = redis.call('HMGET', pkey, 'consumed', 'held')
  local consumed = tonumber(v[1]) or 0
  local held = tonumber(v[2]) or 0
  if consumed + held + want <= points then
    local lease_end = math.floor(now / 1000) + tonumber(ARGV[5])
    redis.call('HINCRBY', pkey, 'held', ARGV[4])
    redis.call('HSET', KEYS[3], 'pkg', pkey, 'pid', ARGV[7 + 2 * i], 'pts', ARGV[4], 'idx', i - 1)
    redis.call('ZADD', KEYS[2], fmt(lease_end), ARGV[6])
    return { 1, tat, now, i - 1 }
  end
end

-- No candidate can hold it: the call is refused (402) or paid by the fallback.
if ARGV[7] == '1' and t > 0 then
  if old_tat == nil then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HSET', KEYS[1], 'tat', fmt(tat - tonumber(ARGV[1])))
  end
end
return { 1, tat, now, -1 }
