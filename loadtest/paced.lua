-- wrk -s loadtest/paced.lua: each connection waits $PACE_MS (default 20) milliseconds before each
-- of its requests, so many connections each carry a light load (compare.sh's `paced` workload:
-- 512 connections x one request per ~20 ms, about 25,000 requests/s when the proxy keeps up).
-- The requests are wrk's default, with the headers given by -H.
local pace = tonumber(os.getenv("PACE_MS") or "20")
function delay()
  return pace
end
