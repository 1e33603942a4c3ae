-- HTTP/1.1 pipelining: every write carries DEPTH GET requests back to back.
-- Usage: wrk ... -s bench/wrk/pipeline.lua URL -- DEPTH [PATH]
-- wrk counts each response, so Requests/sec counts every pipelined request.

local batch

init = function(args)
   local depth = tonumber(args[1]) or 16
   local path = args[2] or "/"
   local requests = {}
   for i = 1, depth do
      requests[i] = wrk.format("GET", path)
   end
   batch = table.concat(requests)
end

request = function()
   return batch
end
