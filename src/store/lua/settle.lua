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
-- Returns { replay (1/0), hold (1 done now, 0 none: released or swept), package consumed after
--           (-1 none), usage cell total (-1 none), alert fired (1/0), image count (-1 none) }.
-- (replay.lua, prepended when the script is built, answers a replay and defines encode.)

local hold_done, consumed, cell, fired, images = 0, -1, -1, 0, -1

if ARGV[1] ~= '' then
  local h = redis.call('HMGET', KEYS[2], 'pkg', 'pid', 'pts')
  if h[1] then
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

if ARGV[4] ~= '' then
  cell = redis.call('HINCRBY', KEYS[4], ARGV[4], ARGV[5])
  if ARGV[10] ~= '' then
    cell = redis.call('HINCRBY', KEYS[4], ARGV[10], ARGV[5])
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

local r = { 0, hold_done, consumed, cell, fired, images }
redis.call('SET', KEYS[1], encode(r), 'PX', ARGV[2])
return r
