-- POST the contents of FILE, as a JSON body, on every request (bench/frameworks.py).
-- Usage: wrk ... -s bench/wrk/post_json.lua URL -- FILE
-- init() runs before wrk builds its request, so setting wrk.body here is enough.

init = function(args)
   if args[1] == nil or args[1] == "" then
      error("usage: wrk ... -s post_json.lua URL -- FILE")
   end
   local file = assert(io.open(args[1], "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end
