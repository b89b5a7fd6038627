-- A video call's package charge in one step (SPEC §6): from each candidate in order, take up to
-- its `want` micro-points, never more than it holds apart from others' holds; fire each
-- package's low-balance alert once. Exactly once per request id (a replay returns the first
-- answer).
-- KEYS[1] done marker   KEYS[2] alerted (hash)   KEYS[3..] candidate packages
-- ARGV[1] marker TTL (ms)   ARGV[2..] per candidate: points, want, alert at (-1 never), package id
-- Returns { replay, then per candidate: taken, consumed after, alert fired (1/0) }.
local function encode(r)
  local s = {}
  for i, n in ipairs(r) do s[i] = string.format('%.0f', n) end
  return table.concat(s, ',')
end
local function decode(s)
  local r = {}
  for n in string.gmatch(s, '[^,]+') do r[#r + 1] = tonumber(n) end
  return r
end
local prev = redis.call('GET', KEYS[1])
if prev then
  local r = decode(prev)
  r[1] = 1
  return r
end
local r = { 0 }
for i = 1, #KEYS - 2 do
  local pkey = KEYS[2 + i]
  local base = 2 + (i - 1) * 4
  local points = tonumber(ARGV[base])
  local want = tonumber(ARGV[base + 1])
  local at = tonumber(ARGV[base + 2])
  local v = redis.call('HMGET', pkey, 'consumed', 'held')
  local consumed = tonumber(v[1]) or 0
  local held = tonumber(v[2]) or 0
  local take = math.min(want, math.max(points - consumed - held, 0))
  local fired = 0
  if take > 0 then
    consumed = redis.call('HINCRBY', pkey, 'consumed', string.format('%.0f', take))
    if at >= 0 and consumed >= at then
      fired = redis.call('HSETNX', KEYS[2], ARGV[base + 3], '1')
    end
  end
  r[#r + 1] = take
  r[#r + 1] = consumed
  r[#r + 1] = fired
end
redis.call('SET', KEYS[1], encode(r), 'PX', ARGV[1])
return r
