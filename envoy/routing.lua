-- whisper-gateway: where Envoy's router sends a request: to the route of the model its form names.
--
-- Envoy matches routes on headers, but the model is a field of the multipart body. The filter
-- buffers the body (retries need it buffered anyway), finds the `model` part (multipart.lua),
-- and sets x-whisper-model, which the routes match.

local reply = openai_errors.reply

local MODEL_HEADER = NAMES.MODEL_HEADER
-- Set on uploads of at least CONTEXT.long_upload_bytes (0: never): their routes prefer
-- the engines that finish long clips soonest.
local LONG_UPLOAD_HEADER = NAMES.LONG_UPLOAD_HEADER
-- Set on every request Envoy proxies (route config); one arriving with it has come round a loop
-- (a gateway that is its own backend, or two gateways pointed at each other).
local HOP_HEADER = NAMES.HOP_HEADER
-- Per try, before another engine is asked too (hedged: the first answer wins): the router reads
-- this header, set here from the upload's size so long files get longer.
local PER_TRY_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"
-- What this filter sets (here, and in metering.lua and lanes.lua): a client's own values never
-- reach a route, an engine or a log.
local OWN_HEADERS = {MODEL_HEADER, LONG_UPLOAD_HEADER, NAMES.AUDIO_SECONDS_HEADER, NAMES.AUDIO_ESTIMATED_HEADER,
  NAMES.KEY_ID_HEADER, NAMES.BATCH_LANE_HEADER, NAMES.LONGFORM_HEADER, NAMES.LONGFORM_PARALLEL_HEADER, NAMES.PIECE_HEADER}
-- Long recordings (control_plane/longform/): an upload longer than CONTEXT.longform_above_s (0:
-- never) goes to a longform worker, which sends its pieces back through the pieces listener,
-- whose own filter marks each as a piece (dynamic metadata PIECE_KEY) before this one runs.
local METADATA_NAMESPACE, PIECE_KEY = NAMES.METADATA_NAMESPACE, NAMES.PIECE_KEY

-- The first step: a client's own values of the filter's headers removed (but for a worker's
-- questions, which only the pieces listener takes: longform.lua); true, or nil once it answered
-- 508 (a request that has come round a loop).
local function first_pass(h, headers, piece)
  for _, name in ipairs(OWN_HEADERS) do headers:remove(name) end
  if not piece then
    headers:remove(NAMES.ADMIT_MODEL_HEADER)
    headers:remove(NAMES.ADMIT_KEY_HEADER)
  end
  if headers:get(HOP_HEADER) ~= nil then
    return reply(h, 508, "Loop detected: this request already passed through a whisper-gateway. "
      .. "A backend is the gateway itself, or two gateways point at each other.", "LoopDetected", nil)
  end
  return true
end

-- The deadline of each try (hedged after it: the first answer wins): by the model's measured
-- speed once there is one (control_plane/decide/hedging.py), never under the floor; until then
-- longer for larger uploads. 0: none.
local function try_deadline_ms(model, seconds, bytes)
  local per_audio_s = (CONTEXT.per_try_ms_per_audio_s or {})[model]
  if per_audio_s then return math.max(CONTEXT.per_try_floor_ms or 0, math.ceil(seconds * per_audio_s)) end
  return (CONTEXT.per_try_base_ms or 0) + math.floor(bytes * (CONTEXT.per_try_ms_per_mb or 0) / 1048576)
end

-- The pieces listener's own filter: what comes in there is a piece of a recording a worker split.
local function mark_piece(h)
  h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, PIECE_KEY, "1")
end

-- Whether the request is a piece (only the pieces listener makes them; clients cannot reach it).
local function is_piece(h)
  if (CONTEXT.longform_above_s or 0) <= 0 then return false end
  local fields = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
  return fields ~= nil and fields[PIECE_KEY] ~= nil
end

-- On a piece's answer: how many of its recording's pieces may be at the model's engines now
-- (CONTEXT.longform_parallel moves with the clients' own requests there), which the worker
-- follows for the pieces it has yet to send.
local function tell_parallel(h)
  local fields = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
  if fields == nil or fields[PIECE_KEY] == nil then return end
  h:headers():replace(NAMES.LONGFORM_PARALLEL_HEADER, tostring((CONTEXT.longform_parallel or {})[fields[NAMES.MODEL_KEY]] or 1))
end

-- The last step: where the router sends the request: the model's route, the long-upload subset,
-- and the deadline of each try; a recording longer than CONTEXT.longform_above_s, to the
-- longform workers, with how many of its pieces may be at the engines at once; a piece, marked
-- for the logs (counted in its engine's load, never metered: its recording was).
local function route(h, headers, body, model, seconds, piece)
  headers:replace(MODEL_HEADER, model)
  local above = CONTEXT.longform_above_s or 0
  if piece then
    headers:replace(NAMES.PIECE_HEADER, "1")
  elseif above > 0 and seconds > above then
    headers:replace(NAMES.LONGFORM_HEADER, "1")
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, NAMES.LONGFORM_KEY, "1") -- its answer: metering.lua
    headers:replace(NAMES.LONGFORM_PARALLEL_HEADER, tostring((CONTEXT.longform_parallel or {})[model] or 1))
    headers:remove(PER_TRY_HEADER) -- no hedging of a whole recording (nor of its pieces, below)
    h:clearRouteCache()
    return
  end
  local long_upload_bytes = CONTEXT.long_upload_bytes or 0
  if long_upload_bytes > 0 and body:length() >= long_upload_bytes then headers:replace(LONG_UPLOAD_HEADER, "1") end
  -- A piece is not hedged: a recording has many out at once, and a hedge doubles one's work on an
  -- engine its siblings already fill (bench/routing.py, mixed-lengths: hedged pieces made the
  -- deadlines fall and the engines spiral). A piece that fails is tried again (retries, and its worker).
  local try_ms = piece and 0 or try_deadline_ms(model, seconds, body:length())
  if try_ms > 0 then
    headers:replace(PER_TRY_HEADER, tostring(try_ms))
  else
    headers:remove(PER_TRY_HEADER)
  end
  h:clearRouteCache()
end

return {first_pass = first_pass, route = route, mark_piece = mark_piece, is_piece = is_piece,
  tell_parallel = tell_parallel}
