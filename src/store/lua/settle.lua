-- Settlement of one call, exactly once per request id (SPEC §6, §11.2–3): commit or release its
-- hold, add its units to the month, fire the low-balance alert once, update the image count.
-- Every part is optional. A replay (same id, marker still there) returns the first answer.
--
-- KEYS[1] done marker (string, TTL)   KEYS[2] hold (hash)   KEYS[3] holds index (zset)
-- KEYS[4] month usage (hash: field -> units)   KEYS[5] month index (set of features)
-- KEYS[6] alerted (hash: package -> 1)   KEYS[7] image count (hash: count, held)
-- KEYS[8] image slots (zset: id -> lease end)
-- ARGV[1] 'commit' | 'release' | ''   ARGV[2] marker TTL (ms)   ARGV[3] id
-- ARGV[4] usage field ('' = none)   ARGV[5] units   ARGV[6] feature (month index)
-- ARGV[7] alert at: fire when the held package's consumed reaches it (-1 = never)
-- ARGV[8] image op: '' | 'add' | 'delete' | 'set' | 'release'   ARGV[9] reported count (set)
-- ARGV[10] a second usage field that gets the same units ('' = none; its total is returned)
-- When a commit finds no hold (its lease ran out under a call still in flight, and the sweep gave
-- it back), the call is paid as SPEC §6 pays it now: by the first candidate package that holds
-- the whole factor beyond the holds in flight, else by the fallback payer. Its units then go to
-- the payer that really paid:
-- ARGV[11] factor (micro-points; 0 = no candidates: a missing hold commits nothing)
-- ARGV[12], ARGV[13] the usage field and second field when no candidate can pay
-- KEYS[9..] candidate packages (hash: consumed, held), in SPEC §6 order
-- ARGV[14..] per candidate: points, package id, alert at (-1 = never), usage field
-- Returns { replay (1/0), hold (1 done now, 0 none: released or swept), package consumed after
--           (-1 none), usage cell total (-1 none), alert fired (1/0), image count (-1 none),
--           paid instead (-1 no: the hold or nothing; i >= 0 candidate i; -2 the fallback) }.
-- (replay.lua, prepended when the script is built, answers a replay and defines encode.)

local hold_done, consumed, cell, fired, images, instead = 0, -1, -1, 0, -1, -1
local field, also = ARGV[4], ARGV[10]

if ARGV[1] ~= '' then
  local h = redis.call('HMGET', KEYS[2], 'pkg', 'pid', 'pts')
  local want = tonumber(ARGV[11]) or 0
  if not h[1] and ARGV[1] == 'commit' and want > 0 then
    instead = -2
    for i = 1, #KEYS - 8 do
      local pkey = KEYS[8 + i]
      local base = 14 + (i - 1) * 4
      local v = redis.call('HMGET', pkey, 'consumed', 'held')
      local c = tonumber(v[1]) or 0
      local held = tonumber(v[2]) or 0
      if c + held + want <= tonumber(ARGV[base]) then
        consumed = redis.call('HINCRBY', pkey, 'consumed', ARGV[11])
        local at = tonumber(ARGV[base + 2])
        if at >= 0 and consumed >= at then
          fired = redis.call('HSETNX', KEYS[6], ARGV[base + 1], '1')
        end
        field, also = ARGV[base + 3], ''
        instead = i - 1
        break
      end
    end
    if instead == -2 then
      field, also = ARGV[12], ARGV[13]
    end
  elseif h[1] then
    local pts = tonumber(h[3])
    redis.call('HINCRBY', h[1], 'held', -pts)
    if ARGV[1] == 'commit' then
      consumed = redis.call('HINCRBY', h[1], 'consumed', pts)
      local at = tonumber(ARGV[7])
      if at >= 0 and consumed >= at then
        fired = redis.call('HSETNX', KEYS[6], h[2], '1')
      end
    end
    redis.call('DEL', KEYS[2])
    redis.call('ZREM', KEYS[3], ARGV[3])
    hold_done = 1
  end
end

if ARGV[4] ~= '' and field ~= '' then
  cell = redis.call('HINCRBY', KEYS[4], field, ARGV[5])
  if also ~= '' then
    cell = redis.call('HINCRBY', KEYS[4], also, ARGV[5])
  end
  redis.call('SADD', KEYS[5], ARGV[6])
end

local op = ARGV[8]
if op ~= '' then
  if redis.call('ZREM', KEYS[8], ARGV[3]) == 1 then
    redis.call('HINCRBY', KEYS[7], 'held', -1)
  end
  if op == 'add' then
    images = redis.call('HINCRBY', KEYS[7], 'count', 1)
  elseif op == 'delete' then
    images = tonumber(redis.call('HGET', KEYS[7], 'count')) or 0
    if images > 0 then images = redis.call('HINCRBY', KEYS[7], 'count', -1) end
  elseif op == 'set' then
    images = tonumber(ARGV[9])
    redis.call('HSET', KEYS[7], 'count', ARGV[9])
  else
    images = tonumber(redis.call('HGET', KEYS[7], 'count')) or 0
  end
end

local r = { 0, hold_done, consumed, cell, fired, images, instead }
redis.call('SET', KEYS[1], encode(r), 'PX', ARGV[2])
return r
