-- Every write carries one GET per PATH, back to back (HTTP/1.1 pipelining); wrk counts
-- each response. With `-- / /tast/hello` every request of a connection goes to another
-- group than the one before it (bench/routes.py).
-- Usage: wrk ... -s bench/wrk/sequence.lua URL -- PATH [PATH ...]

local batch

init = function(args)
   local requests = {}
   for i, path in ipairs(args) do
      requests[i] = wrk.format("GET", path)
   end
   if #requests == 0 then
      requests[1] = wrk.format("GET", "/")
   end
   batch = table.concat(requests)
end

request = function()
   return batch
end
