-- Shared by the scenario scripts next to it; each loads it with dofile() from its own folder,
-- so the benchmark works from any working directory.
--
-- Script arguments (after `--` on the wrk command line), the same for every scenario:
--   1: file with one seeded recording id per line (get, mixed)
--   2: share of creates in the mixed scenario (default 0.2)
--   3: random seed; each wrk thread derives its own from it
-- Headers given with `wrk -H` (the bearer token) go out on every request.
--
-- response() counts HTTP status codes in each thread; done() merges the threads' counts and
-- prints one line `BENCH_JSON {...}` (req/s, latency percentiles, non-2xx, socket errors,
-- status histogram) that bench/run.py parses. wrk's own text summary is ignored.

local WORDS = {
   "patient", "reports", "headache", "fever", "cough", "fatigue", "nausea", "dizziness", "chest",
   "pain", "shortness", "of", "breath", "blood", "pressure", "stable", "follow", "up", "in", "two",
   "weeks", "prescribed", "ibuprofen", "advised", "rest", "and", "fluids", "history", "asthma",
   "allergies", "none", "known", "examination", "unremarkable", "plan", "review", "results",
   "denies", "vomiting", "abdomen", "soft", "non-tender", "heart", "sounds", "normal", "lungs",
   "clear", "to", "auscultation", "bilaterally", "temperature", "37.8", "pulse", "regular",
}
local NOTE_TYPES = { "general", "consultation", "discharge", "follow_up", "referral" }
local FLAGS = { '"dosage"', '"allergy"', '"name"', '"date"' }
local POOL_SIZE = 64 -- pre-built transcripts: building 300 words per request would load the client

local thread_count = 0
threads = {}

function setup(thread)
   thread_count = thread_count + 1
   thread:set("tid", thread_count)
   table.insert(threads, thread)
end

statuses = {}

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function with_headers(extra)
   local h = {}
   for k, v in pairs(wrk.headers) do h[k] = v end
   for k, v in pairs(extra or {}) do h[k] = v end
   return h
end

local function read_ids(path)
   local list = {}
   local f = assert(io.open(path, "r"), "cannot open ids file " .. tostring(path))
   for line in f:lines() do
      if #line > 0 then list[#list + 1] = line end
   end
   f:close()
   assert(#list > 0, "no ids in " .. path)
   return list
end

local function transcript()
   local words = {}
   for i = 1, math.random(30, 300) do words[i] = WORDS[math.random(#WORDS)] end
   return table.concat(words, " ")
end

function common_init(args, need_ids)
   create_ratio = tonumber(args[2] or "0.2")
   math.randomseed(tonumber(args[3] or "1") * 7919 + (tid or 0))
   get_headers = with_headers()
   post_headers = with_headers({ ["Content-Type"] = "application/json" })
   if need_ids then ids = read_ids(args[1]) end
   transcripts = {}
   for i = 1, POOL_SIZE do transcripts[i] = transcript() end
end

local function flags()
   local out = {}
   for _, flag in ipairs(FLAGS) do
      if math.random() < 0.25 then out[#out + 1] = flag end
   end
   return table.concat(out, ",")
end

-- A body like the PWA's: server-chosen id, 30-300 word transcript, verification results.
function create_request()
   local note_type = NOTE_TYPES[math.random(#NOTE_TYPES)]
   local body = string.format(
      '{"patient_ref":"PAT-%05d","title":"%s note %d","note_type":"%s","status":"%s",' ..
      '"audio_path":"audio/bench/%d-%d.webm","duration_seconds":%d.%d,"transcript":"%s",' ..
      '"verification_results":{"checked":%s,"score":0.%03d,"flags":[%s]},' ..
      '"recorded_at":"2024-%02d-%02dT%02d:%02d:00Z"}',
      math.random(1, 400), note_type, math.random(1, 99999), note_type,
      math.random() < 0.5 and "pending" or "uploaded",
      tid or 0, math.random(1, 999999), math.random(5, 900), math.random(0, 9),
      transcripts[math.random(#transcripts)],
      math.random() < 0.5 and "true" or "false", math.random(0, 999), flags(),
      math.random(1, 12), math.random(1, 28), math.random(0, 23), math.random(0, 59))
   return wrk.format("POST", "/api/recordings", post_headers, body)
end

function get_request()
   return wrk.format("GET", "/api/recordings/" .. ids[math.random(#ids)], get_headers)
end

local function merged_statuses()
   local codes = {}
   for _, t in ipairs(threads) do
      for code, count in pairs(t:get("statuses") or {}) do codes[code] = (codes[code] or 0) + count end
   end
   return codes
end

function done(summary, latency, requests)
   local codes, parts, non2xx = merged_statuses(), {}, 0
   for code, count in pairs(codes) do
      parts[#parts + 1] = string.format('"%d":%d', code, count)
      if code < 200 or code > 299 then non2xx = non2xx + count end
   end
   local e = summary.errors
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"rps":%.1f,' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},' ..
      '"non2xx":%d,"socket_errors":%d,' ..
      '"socket_errors_detail":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"statuses":{%s}}\n',
      summary.requests, summary.duration, seconds > 0 and summary.requests / seconds or 0,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      non2xx, e.connect + e.read + e.write + e.timeout,
      e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
