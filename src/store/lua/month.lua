-- One tenant's usage for one month: every feature in the month index with its cells.
-- KEYS[1] month index (set of features)   ARGV[1] the month key prefix ('tp:{acme}:m:2026-11:')
-- Returns { feature, { field, units, ... }, ... }.
local r = {}
for _, f in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  r[#r + 1] = f
  r[#r + 1] = redis.call('HGETALL', ARGV[1] .. f)
end
return r
