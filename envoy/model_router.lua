-- whisper-gateway: routes an OpenAI-style multipart audio request by its `model` form field.
--
-- Envoy matches routes on headers, but the model is a field of the multipart body. This filter
-- buffers the body (retries need it buffered anyway), finds the `model` part, and sets
-- x-whisper-model, which the routes match. Uploads are large and the field is small, so it
-- copies a small window at each end of the body first, and the whole body only when the field
-- is not in either window (a multipart boundary never occurs inside a part, so any delimiter
-- found in a window is a real one). The names clients may use, and the other values it needs,
-- are CONTEXT, constants the control plane writes ahead of this source
-- (control_plane/builders/lua_source.py): models = {name or alias -> model}.

local MODEL_HEADER = "x-whisper-model"
-- How many worker threads Envoy runs (control_plane/supervisor.py sets it; control_plane/names.py).
local WORKERS_ENV = "WHISPER_GATEWAY_WORKERS"
-- Set on uploads of at least CONTEXT.long_upload_bytes (0: never): their routes prefer
-- the engines that finish long clips soonest.
local LONG_UPLOAD_HEADER = "x-whisper-long-upload"
-- Dynamic metadata (a client cannot forge it, control_plane/names.py): REPLY_KEY marks the
-- filter's own answers so Envoy's local-reply mapper leaves them as they are; the others carry
-- a routed request's model and audio-seconds to the log of failed requests, which meters them.
local METADATA_NAMESPACE = "whisper_gateway"
local REPLY_KEY = "lua_reply"
local MODEL_KEY, SECONDS_KEY, ESTIMATED_KEY, KEY_ID_KEY = "model", "audio_seconds", "audio_estimated", "key_id"
local BATCH_LANE_KEY = "batch_lane"
-- Set on every request Envoy proxies (route config); one arriving with it has come round a loop
-- (a gateway that is its own backend, or two gateways pointed at each other).
local HOP_HEADER = "x-whisper-gateway-hop"
-- Per try, before another engine is asked too (hedged: the first answer wins): the router reads
-- this header, set here from the upload's size so long files get longer.
local PER_TRY_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"
-- The upload's audio-seconds, and "1" when that is an estimate (envoy/audio_duration.lua).
local AUDIO_SECONDS_HEADER = "x-whisper-audio-seconds"
local AUDIO_ESTIMATED_HEADER = "x-whisper-audio-estimated"
-- The id of the API key a request was admitted with (envoy/api_keys.lua), for the logs that meter it.
local KEY_ID_HEADER = "x-whisper-key-id"
-- On a batch key's request, with CONTEXT.batch_lane_prefix: the model's batch lane, whose requests
-- in flight the quota filter after this one counts (control_plane/builders/quotas.py).
local BATCH_LANE_HEADER = "x-whisper-batch-lane"
-- The key's plan and the upload's cost in whole audio-seconds, as dynamic metadata: the quota
-- filters after this one charge them (control_plane/builders/quotas.py), and say on a 429 which
-- limit refused it.
local LIMITED_HEADER = "x-whisper-limited"
local PLAN_KEY, COST_KEY = "plan", "audio_cost"
-- What this filter sets: a client's own values never reach a route, an engine or a log.
local OWN_HEADERS = {MODEL_HEADER, LONG_UPLOAD_HEADER, AUDIO_SECONDS_HEADER, AUDIO_ESTIMATED_HEADER, KEY_ID_HEADER,
  BATCH_LANE_HEADER}
local WINDOW = 4096
local MAX_MODEL_BYTES = 256
-- A part's header block: engines' form parsers fail (HTTP 500) on huge or binary ones.
local MAX_PART_HEADER_BYTES = 8192
local PART_HEADER_CONTROL = "[%z\1-\8\11\12\14-\31\127]"

local find, sub, lower = string.find, string.sub, string.lower

-- Copies of a large body live in LuaJIT's memory, which Envoy's overload manager does not see:
-- collect them now, so memory follows the uploads in flight rather than the garbage left behind.
local COLLECT_AFTER_BYTES = 1048576
local function release(copied_bytes)
  if copied_bytes >= COLLECT_AFTER_BYTES then collectgarbage("collect") end
end

-- An upload is buffered whole and kept until its request ends (a retry replays it), so one
-- admitted while Envoy's heap was low still grows to its full size, which the overload manager
-- cannot foresee. Each worker therefore admits uploads against its share of
-- CONTEXT.upload_budget_bytes (of limits.max_heap_mb) by what they declare (Content-Length, or
-- the upload limit without one) x the copies kept: past it, a new upload gets 503 before a byte
-- of it is buffered, and nothing admitted fails for want of memory. A reservation returns when
-- its request's handle is collected (its stream ended, however it ended): when one would not
-- fit, a full collection is forced first, at most every FORCED_COLLECT_MS. A worker holding
-- nothing admits one upload whatever its size, so a share smaller than an upload still serves.
local WORKERS = math.max(1, tonumber(os.getenv(WORKERS_ENV) or "") or 1)
local FORCED_COLLECT_MS = 20
local reserved_bytes, forced_at = 0, nil
local reservations = setmetatable({}, {__mode = "k"}) -- handle -> its reservation, collected with it

local function reserve_upload(h, headers)
  local budget = CONTEXT.upload_budget_bytes or 0
  if budget <= 0 then return true end
  local limit = CONTEXT.max_upload_bytes or math.huge
  local bytes = math.min(tonumber(headers:get("content-length") or "") or limit, limit) * (CONTEXT.upload_copies or 1)
  local share = budget / WORKERS
  if reserved_bytes > 0 and reserved_bytes + bytes > share then
    local now = h:timestamp()
    if forced_at == nil or now - forced_at >= FORCED_COLLECT_MS then
      forced_at = now -- a handle, then the table's entry, then the reservation: a cycle each
      for _ = 1, 3 do collectgarbage("collect") end
    end
    if reserved_bytes > 0 and reserved_bytes + bytes > share then return false end
  end
  reserved_bytes = reserved_bytes + bytes
  local reservation = newproxy(true)
  getmetatable(reservation).__gc = function() reserved_bytes = reserved_bytes - bytes end
  reservations[h] = reservation
  return true
end

local function json_string(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", string.byte(c))
  end)
  -- Error messages echo client bytes; keep the JSON valid whatever they were.
  return '"' .. s:gsub("[\128-\255]", "?") .. '"'
end

-- An OpenAI-style error; `code` is the status unless OpenAI names one (invalid_api_key).
local function reply(h, status, message, error_type, param, code, retry_after)
  local body = '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(error_type)
    .. ',"param":' .. (param and json_string(param) or "null") .. ',"code":' .. (code and json_string(code) or status)
    .. "}}"
  h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, REPLY_KEY, "1")
  h:respond({[":status"] = tostring(status), ["content-type"] = "application/json",
    ["retry-after"] = retry_after and tostring(retry_after) or nil}, body)
end

local function bad_request(h, message, param)
  return reply(h, 400, message, "BadRequestError", param)
end

-- The boundary parameter of a multipart/form-data Content-Type, quoted or not.
local function boundary_of(content_type)
  local lowered = lower(content_type)
  if not find(lowered, "^%s*multipart/form%-data") then return nil end
  local _, e = find(lowered, ";%s*boundary%s*=%s*")
  if not e then return nil end
  local rest = sub(content_type, e + 1)
  local value
  if sub(rest, 1, 1) == '"' then
    value = rest:match('^"([^"]*)"')
  else
    value = rest:match("^([^;%s]+)")
  end
  if not value or #value == 0 or #value > 70 then return nil end
  return value
end

-- A parameter (`name`, `filename`) of a part's Content-Disposition header, quoted or not.
local function disposition_param(line, lowered_line, param)
  local _, e = find(lowered_line, "[;%s]" .. param .. "%s*=%s*")
  if not e then return nil end
  local rest = sub(line, e + 1)
  if sub(rest, 1, 1) == '"' then return rest:match('^"([^"]*)"') end
  return rest:match("^([^;%s]+)")
end

local function disposition(headers)
  local lowered = lower(headers)
  local start = find(lowered, "content%-disposition:")
  if not start then return nil, nil end
  local line_end = find(headers, "\r\n", start, true) or (#headers + 1)
  local line = sub(headers, start, line_end - 1)
  local lowered_line = lower(line)
  return disposition_param(line, lowered_line, "name"), disposition_param(line, lowered_line, "filename")
end

-- Appends to `parts` every part that starts in `s`, a piece of the body beginning at body offset
-- `base`: {name, filename, at, start, stop} with 0-based body offsets of its delimiter and its
-- value (stop exclusive, nil when the value runs past the piece); parts.closing is the closing
-- delimiter's offset. Returns true when a part's headers are cut off.
local function scan(s, delim, base, parts)
  local pos = 1
  while true do
    local d = find(s, delim, pos, true)
    if not d then return false end
    local after = d + #delim
    if d == 1 or sub(s, d - 2, d - 1) == "\r\n" then
      if sub(s, after, after + 1) == "--" then -- the closing delimiter
        parts.closing = base + d - 1
        return false
      end
      local header_end = find(s, "\r\n\r\n", after, true)
      if not header_end then return true end
      local headers = sub(s, after, header_end - 1)
      local name, filename = disposition(headers)
      local value_start = header_end + 4
      local value_end = find(s, "\r\n" .. delim, value_start, true)
      parts[#parts + 1] = {name = name, filename = filename, at = base + d - 1, start = base + value_start - 1,
        stop = value_end and (base + value_end - 1) or nil,
        bad_headers = #headers > MAX_PART_HEADER_BYTES or find(headers, PART_HEADER_CONTROL) ~= nil}
      if not value_end then return false end -- the rest of the piece is this part's value
      pos = value_end + 2
    else
      pos = after
    end
  end
end

local function count(parts, name)
  local found = {}
  for _, part in ipairs(parts) do
    if part.name == name then found[#found + 1] = part end
  end
  return found
end

-- The form's parts. The fields sit around the one large part (the audio), so a window at each
-- end finds them; the whole body is copied only when they are not all there.
local function form_parts(body, delim)
  local length = body:length()
  local parts = {}
  if length <= 2 * WINDOW then
    scan(body:getBytes(0, length), delim, 0, parts)
    return parts
  end
  local cut = scan(body:getBytes(0, WINDOW), delim, 0, parts)
  cut = scan(body:getBytes(length - WINDOW, WINDOW), delim, length - WINDOW, parts) or cut
  local models = count(parts, "model")
  if cut or #models ~= 1 or models[1].stop == nil or #count(parts, "file") == 0 then
    parts = {}
    scan(body:getBytes(0, length), delim, 0, parts)
    release(length)
  end
  return parts
end

-- Where a part's value ends: known from its own piece, or just before the next delimiter after it
-- (a closing delimiter seen in the first window can come before parts found in the last).
local function value_end(part, parts)
  if part.stop then return part.stop end
  local next_at = parts.closing
  if next_at and next_at - 2 < part.start then next_at = nil end
  for _, other in ipairs(parts) do
    if other.at - 2 >= part.start and (next_at == nil or other.at < next_at) then next_at = other.at end
  end
  return next_at and next_at - 2 or nil
end

-- Seconds of audio in the upload (envoy/audio_duration.lua), as headers the engines and the
-- upload's tries' logs see (a 2xx try's end meters it), and as dynamic metadata for the log of
-- failed requests.
local function measure_audio(h, headers, body, parts, model)
  local file = count(parts, "file")[1]
  local stop = value_end(file, parts) or body:length()
  local seconds, estimated = audio_duration(function(offset, n) return body:getBytes(file.start + offset, n) end,
    stop - file.start, file.filename, CONTEXT.max_audio_seconds or math.huge)
  local shown = string.format("%.3f", seconds)
  headers:replace(AUDIO_SECONDS_HEADER, shown)
  if estimated then headers:replace(AUDIO_ESTIMATED_HEADER, "1") end
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, MODEL_KEY, model)
  metadata:set(METADATA_NAMESPACE, SECONDS_KEY, shown)
  if estimated then metadata:set(METADATA_NAMESPACE, ESTIMATED_KEY, "1") end
  return seconds
end

-- The key's plan and the upload's cost for the quota filters. Each of the CONTEXT.envoys
-- gateways holds 1/envoys of a budget, so an upload that costs more than that share of a whole
-- window could never pass them: it is answered here, saying why.
local function charge(h, grant, seconds)
  local plan = grant.plan and CONTEXT.plans[grant.plan]
  if plan == nil then return false end
  local cost, envoys = math.max(1, math.ceil(seconds)), CONTEXT.envoys or 1
  for _, limit in ipairs({{"audio_seconds_per_minute", "minute"}, {"audio_seconds_per_day", "day"}}) do
    local allowed = plan[limit[1]]
    if allowed and cost * envoys > allowed then
      reply(h, 429, string.format("This upload is %d audio-seconds; the API key's plan allows %d per %s"
        .. (envoys > 1 and ", %d through each of the %d gateways." or "."), cost, allowed, limit[2],
        math.floor(allowed / envoys), envoys), "audio_seconds", "file", "rate_limit_exceeded")
      return true
    end
  end
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, PLAN_KEY, grant.plan)
  metadata:set(METADATA_NAMESPACE, COST_KEY, cost)
  return false
end

-- The deadline of each try (hedged after it: the first answer wins): by the model's measured
-- speed once there is one (control_plane/decide/hedging.py), never under the floor; until then
-- longer for larger uploads. 0: none.
local function try_deadline_ms(model, seconds, bytes)
  local per_audio_s = (CONTEXT.per_try_ms_per_audio_s or {})[model]
  if per_audio_s then return math.max(CONTEXT.per_try_floor_ms or 0, math.ceil(seconds * per_audio_s)) end
  return (CONTEXT.per_try_base_ms or 0) + math.floor(bytes * (CONTEXT.per_try_ms_per_mb or 0) / 1048576)
end

-- Where the router sends the request: the model's route, the long-upload subset, and the
-- deadline of each try.
local function set_routing(h, headers, body, model, seconds)
  headers:replace(MODEL_HEADER, model)
  local long_upload_bytes = CONTEXT.long_upload_bytes or 0
  if long_upload_bytes > 0 and body:length() >= long_upload_bytes then headers:replace(LONG_UPLOAD_HEADER, "1") end
  local try_ms = try_deadline_ms(model, seconds, body:length())
  if try_ms > 0 then
    headers:replace(PER_TRY_HEADER, tostring(try_ms))
  else
    headers:remove(PER_TRY_HEADER)
  end
  h:clearRouteCache()
end

local function served_names(models)
  local names = {}
  for name, _ in pairs(models) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, ", ")
end

-- Why the form cannot be transcribed, or nil; `model` is the one `model` part when it is fine.
local function form_problem(body, delim, parts)
  local length = body:length()
  local tail_length = math.min(length, #delim + 256)
  if not find(body:getBytes(length - tail_length, tail_length), delim .. "--", 1, true) then
    return "The multipart body is truncated: its closing boundary is missing.", nil
  end
  for _, part in ipairs(parts) do
    if part.bad_headers then
      return "A form part's headers are over " .. MAX_PART_HEADER_BYTES
        .. " bytes or contain control characters.", nil
    end
    if part.name == nil then return "A form part has no Content-Disposition name.", nil end
    if find(part.name, "[^\32-\126]") then
      return "Form field names must be printable ASCII.", nil
    end
  end
  local models, files = count(parts, "model"), count(parts, "file")
  if #models == 0 then return "Missing form field `model`.", "model" end
  if #models > 1 then return "The form field `model` is given more than once.", "model" end
  if #files == 0 then return "Missing form field `file` (the audio).", "file" end
  if #files > 1 then return "The form field `file` is given more than once.", "file" end
  local file = files[1]
  if file.stop ~= nil and file.stop == file.start then return "The uploaded file is empty.", "file" end
  if file.filename and (find(file.filename, "[/\\%c]") or file.filename == ".." ) then
    return "The file name must be a plain name, without a path.", "file"
  end
  local model = models[1]
  if model.stop == nil then return "The multipart body is truncated.", nil end
  if model.stop == model.start then return "The form field `model` is empty.", "model" end
  if model.stop - model.start > MAX_MODEL_BYTES then
    return "The form field `model` is longer than " .. MAX_MODEL_BYTES .. " bytes.", "model"
  end
  return nil, nil
end

function envoy_on_request(h)
  local headers = h:headers()
  for _, name in ipairs(OWN_HEADERS) do headers:remove(name) end
  if headers:get(HOP_HEADER) ~= nil then
    return reply(h, 508, "Loop detected: this request already passed through a whisper-gateway. "
      .. "A backend is the gateway itself, or two gateways point at each other.", "LoopDetected", nil)
  end
  local grant = nil
  if CONTEXT.keys_required then -- before the body: a stranger's upload is never buffered
    local why, wrong
    grant, why, wrong = authenticate(headers)
    if grant == nil then
      -- An address guessing keys gets 429 until its window ends; its valid keys still pass (api_keys.lua).
      local wait = bad_key_wait(h, wrong)
      if wait then
        return reply(h, 429, "Too many requests with a wrong API key from this address; send a valid key, "
          .. "or wait " .. wait .. " s.", "bad_api_keys", nil, "too_many_bad_keys", wait)
      end
      return reply(h, 401, why, "AuthenticationError", nil, "invalid_api_key")
    end
  end
  if headers:get(":method") ~= "POST" then
    return reply(h, 405, "Method Not Allowed: send POST with a multipart/form-data body.",
      "MethodNotAllowed", nil)
  end
  local content_type = headers:get("content-type")
  local boundary = content_type and boundary_of(content_type)
  if not boundary then
    return bad_request(h, "Expected a multipart/form-data body with a boundary; Content-Type was "
      .. (content_type or "missing") .. ".", nil)
  end
  if not reserve_upload(h, headers) then
    return reply(h, 503, "The gateway holds as many uploads in flight as its memory allows "
      .. "(limits.max_heap_mb); retry shortly.", "ServiceUnavailableError", nil, nil, 1)
  end
  local body = h:body()
  -- h:body() yields: handles taken before it are no longer valid.
  if body == nil or body:length() == 0 then
    return bad_request(h, "Missing form field `model` (the request has no body).", "model")
  end
  local delim = "--" .. boundary
  local parts = form_parts(body, delim)
  local problem, param = form_problem(body, delim, parts)
  if problem then return bad_request(h, problem, param) end
  local part = count(parts, "model")[1]
  local name = body:getBytes(part.start, part.stop - part.start)
  if find(name, "%c") then
    return bad_request(h, "The form field `model` contains control characters.", "model")
  end
  local models = CONTEXT.models or {}
  local model = models[name]
  if model == nil then
    return reply(h, 404, "The model `" .. name .. "` does not exist. Served models: " .. served_names(models) .. ".",
      "NotFoundError", "model")
  end
  if grant and not allows(grant, model) then
    return reply(h, 403, "This API key may not use the model `" .. name .. "`.", "PermissionDeniedError", "model",
      "model_not_allowed")
  end
  headers = h:headers() -- h:body() yielded: the handle taken before it is no longer valid
  if grant then
    headers:replace(KEY_ID_HEADER, grant.id)
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, KEY_ID_KEY, grant.id)
  end
  local seconds = measure_audio(h, headers, body, parts, model) -- before an alias moves the bytes
  if grant and grant.class == "batch" and CONTEXT.batch_closed[model] then -- control_plane/decide/lanes.py
    return reply(h, 429, "The model `" .. model .. "` is busy with interactive requests; this key's batch requests "
      .. "wait until its backlog drains.", "batch_lane", nil, "rate_limit_exceeded", CONTEXT.batch_closed[model])
  end
  if grant and grant.class == "batch" and CONTEXT.batch_lane_prefix then
    local lane = CONTEXT.batch_lane_prefix .. model -- control_plane/names.py batch_lane()
    headers:replace(BATCH_LANE_HEADER, lane)
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, BATCH_LANE_KEY, lane)
  end
  if grant and charge(h, grant, seconds) then return end
  if model ~= name then
    -- An alias: engines know only the model's own name, so the form must carry that. Lua
    -- memory is outside Envoy's heap (and its overload manager), so the copy is made once, in
    -- pieces, and collected at once rather than left for the incremental collector.
    local length = body:length()
    body:setBytes(table.concat({body:getBytes(0, part.start), model,
      body:getBytes(part.stop, length - part.stop)}))
    release(length)
  end
  set_routing(h, headers, body, model, seconds)
end

-- The quota filters' `x-ratelimit-limit`, `-remaining` and `-reset`, appended as the response
-- passes back through them (audio-seconds first, then requests: builders/quotas.py), become
-- OpenAI's `x-ratelimit-*-requests` and `x-ratelimit-*-audio-seconds`; a 429 of theirs gets
-- Retry-After: when enough of its window has refilled for this request.
local WINDOW_S = 60

local function seconds_until_full(limit, remaining)
  return math.ceil(math.max(0, limit - remaining) * WINDOW_S / limit)
end

local function retry_after(h, limited, sets)
  local charged = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE) or {}
  local plan = CONTEXT.plans[charged[PLAN_KEY] or ""] or {}
  local cost = tonumber(charged[COST_KEY]) or 1
  local envoys = CONTEXT.envoys or 1 -- each charges envoys x the cost against the whole budget
  if limited == "requests" and sets.requests then
    return math.ceil(envoys * WINDOW_S / sets.requests.limit)
  elseif limited == "audio_seconds" and sets["audio-seconds"] then
    local audio = sets["audio-seconds"]
    return math.ceil(math.max(1, cost * envoys - audio.remaining) * WINDOW_S / audio.limit)
  elseif plan.audio_seconds_per_day then -- its filter sends no counts: the time to refill this upload
    return math.ceil(cost * envoys * 86400 / plan.audio_seconds_per_day)
  end
  return WINDOW_S
end

local function rate_limit_headers(h)
  local headers = h:headers()
  local count = headers:getNumValues("x-ratelimit-limit")
  if count == 0 then return end
  local kinds = count >= 2 and {"audio-seconds", "requests"} or {"requests"}
  local sets = {}
  for i, kind in ipairs(kinds) do
    sets[kind] = {limit = tonumber(headers:getAtIndex("x-ratelimit-limit", i - 1)) or 1,
      remaining = tonumber(headers:getAtIndex("x-ratelimit-remaining", i - 1)) or 0}
  end
  for _, field in ipairs({"limit", "remaining", "reset"}) do headers:remove("x-ratelimit-" .. field) end
  for kind, set in pairs(sets) do
    headers:replace("x-ratelimit-limit-" .. kind, tostring(set.limit))
    headers:replace("x-ratelimit-remaining-" .. kind, tostring(set.remaining))
    headers:replace("x-ratelimit-reset-" .. kind, seconds_until_full(set.limit, set.remaining) .. "s")
  end
  local limited = headers:get(LIMITED_HEADER)
  if limited and headers:get(":status") == "429" then
    headers:replace("retry-after", tostring(math.max(1, retry_after(h, limited, sets))))
  end
end

-- Defined only where plans are enforced: a Lua filter with an envoy_on_response runs it for every
-- response, and without quotas there is nothing for it to do.
if CONTEXT.keys_required and next(CONTEXT.plans or {}) ~= nil then
  envoy_on_response = rate_limit_headers
end
