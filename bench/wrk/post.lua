-- POST a fixed body of SIZE bytes (the letter "a" repeated) on every request.
-- Usage: wrk ... -s bench/wrk/post.lua URL -- SIZE
-- init() runs before wrk builds its request, so setting wrk.body here is enough.

init = function(args)
   local size = tonumber(args[1]) or 1024
   wrk.method = "POST"
   wrk.body = string.rep("a", size)
   wrk.headers["Content-Type"] = "application/octet-stream"
end
