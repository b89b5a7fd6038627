-- wrk -s loadtest/tenants.lua: each request carries the next of the API keys tenant-1 ..
-- tenant-$TENANTS (default 10000), in turn (compare.sh's and instructions.sh's 10,000 tenants).
local reqs, n, i = {}, tonumber(os.getenv("TENANTS") or "10000"), 0
function init(args)
  for k = 1, n do reqs[k] = wrk.format("GET", "/v1/infer", { ["x-api-key"] = "tenant-" .. k }) end
end
function request()
  i = i % n + 1
  return reqs[i]
end
