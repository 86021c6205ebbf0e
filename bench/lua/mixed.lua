-- mixed: GET by random seeded id, or (share given by script argument 2, default 20 %) a create.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args) common_init(args, true) end
function request()
   if math.random() < create_ratio then return create_request() end
   return get_request()
end
