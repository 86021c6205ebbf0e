-- create: POST /api/recordings, a new recording (server-chosen id) on every request.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args) common_init(args, false) end
function request() return create_request() end
