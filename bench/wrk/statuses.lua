-- Counts the responses by status code, and the 503s that carry a Retry-After header;
-- prints both after wrk's own summary (read by common.parse_wrk):
--   statuses: 200=1234 503=56
--   503 with Retry-After: 56
-- Usage: wrk ... -s bench/wrk/statuses.lua URL
-- Every wrk thread counts its own responses; done() adds the threads' counts up.

local threads = {}

setup = function(thread)
   table.insert(threads, thread)
end

init = function(args)
   counts = {}          -- global: done() reads it with thread:get()
   with_retry_after = 0
end

response = function(status, headers, body)
   counts[status] = (counts[status] or 0) + 1
   if status == 503 then
      for name, _ in pairs(headers) do
         if string.lower(name) == "retry-after" then
            with_retry_after = with_retry_after + 1
            break
         end
      end
   end
end

done = function(summary, latency, requests)
   local total = {}
   local retry = 0
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("counts") or {}) do
         total[status] = (total[status] or 0) + n
      end
      retry = retry + (thread:get("with_retry_after") or 0)
   end
   local codes = {}
   for status, _ in pairs(total) do
      table.insert(codes, status)
   end
   table.sort(codes)
   local parts = {}
   for _, status in ipairs(codes) do
      table.insert(parts, status .. "=" .. total[status])
   end
   io.write("statuses: " .. table.concat(parts, " ") .. "\n")
   io.write("503 with Retry-After: " .. retry .. "\n")
end
