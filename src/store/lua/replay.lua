-- Prepended to the scripts that run exactly once per request id (settle.lua, take.lua): KEYS[1]
-- is the request's done marker, whose value is the first answer, `encode`d. A replay returns that
-- answer with its first element set to 1. `encode` writes integers in full (`%.0f`: Lua's default
-- formatting keeps only 14 digits).
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
