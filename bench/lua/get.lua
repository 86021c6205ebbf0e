-- get: GET /api/recordings/{id}, ids drawn at random from the seeded ones.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args) common_init(args, true) end
function request() return get_request() end
