-- A video call's package charge in one step (SPEC §6, STORE.md): greedily in candidate order,
-- take from each what it holds beyond the holds of calls in flight, until `want` (the total) is
-- taken; a candidate's own cap, when given, bounds its part too. Fires each package's
-- low-balance alert once when asked. Exactly once per request id (a replay returns the first
-- answer).
-- KEYS[1] done marker   KEYS[2] alerted (hash)   KEYS[3..] candidate packages
-- ARGV[1] marker TTL (ms)   ARGV[2] total want (-1 = no total, only the caps)
-- ARGV[3..] per candidate: points, cap (-1 = none), alert at (-1 = never), package id
-- Returns { replay, then per candidate: taken, consumed after, alert fired (1/0) }.
-- (replay.lua, prepended when the script is built, answers a replay and defines encode.)
local r = { 0 }
local left = tonumber(ARGV[2])
for i = 1, #KEYS - 2 do
  local pkey = KEYS[2 + i]
  local base = 3 + (i - 1) * 4
  local points = tonumber(ARGV[base])
  local want = tonumber(ARGV[base + 1])
  local at = tonumber(ARGV[base + 2])
  local v = redis.call('HMGET', pkey, 'consumed', 'held')
  local consumed = tonumber(v[1]) or 0
  local held = tonumber(v[2]) or 0
  local take = math.max(points - consumed - held, 0)
  if want >= 0 then take = math.min(take, want) end
  if left >= 0 then
    take = math.min(take, left)
    left = left - take
  end
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
