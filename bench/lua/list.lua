-- list: GET /api/recordings?limit=50&offset=0 (newest first, with the total count).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local req
function init(args)
   common_init(args, false)
   req = wrk.format("GET", "/api/recordings?limit=50&offset=0", get_headers)
end
function request() return req end
