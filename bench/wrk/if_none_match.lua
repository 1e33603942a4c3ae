-- GET with an If-None-Match header (a conditional request: 304 Not Modified when the tag
-- is the file's current ETag). Used by static.py's revalidate scenario.
-- Usage: wrk ... -s bench/wrk/if_none_match.lua URL -- ETAG
-- ETAG is passed as is, quotes included (e.g. '"6b124fd3-400"'); each server makes its
-- own, so static.py reads it from the server first. init() runs before wrk builds its
-- request, so setting the header here is enough.

init = function(args)
   if args[1] == nil or args[1] == "" then
      error("usage: wrk ... -s if_none_match.lua URL -- ETAG")
   end
   wrk.headers["If-None-Match"] = args[1]
end
