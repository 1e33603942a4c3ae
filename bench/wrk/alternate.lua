-- One GET per write (no pipelining), the PATHs in turn. wrk runs one Lua state per
-- thread, so with as many threads as connections (-tN -cN) every connection walks the
-- PATHs in order: with `-- / /tast/hello` each request of a keep-alive connection is for
-- another group than the one before it (bench/routes.py, scenario `alternate`).
-- Usage: wrk -tN -cN ... -s bench/wrk/alternate.lua URL -- PATH [PATH ...]

local requests = {}
local turn = 0

init = function(args)
   for i, path in ipairs(args) do
      requests[i] = wrk.format("GET", path)
   end
   if #requests == 0 then
      requests[1] = wrk.format("GET", "/")
   end
end

request = function()
   turn = turn % #requests + 1
   return requests[turn]
end
