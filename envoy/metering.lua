-- whisper-gateway: what a request is metered by: the API key it was admitted with, its model and
-- the seconds of audio in its upload, for the engines and the logs.

-- The upload's audio-seconds, and "1" when that is an estimate (envoy/audio_duration.lua).
local AUDIO_SECONDS_HEADER = NAMES.AUDIO_SECONDS_HEADER
local AUDIO_ESTIMATED_HEADER = NAMES.AUDIO_ESTIMATED_HEADER
-- The id of the API key a request was admitted with (envoy/api_keys.lua), for the logs that meter it.
local KEY_ID_HEADER = NAMES.KEY_ID_HEADER
-- Dynamic metadata (a client cannot forge it): these carry a routed request's model and
-- audio-seconds to the log of failed requests, which meters them.
local METADATA_NAMESPACE = NAMES.METADATA_NAMESPACE
local MODEL_KEY, SECONDS_KEY, ESTIMATED_KEY, KEY_ID_KEY = NAMES.MODEL_KEY, NAMES.SECONDS_KEY, NAMES.ESTIMATED_KEY,
  NAMES.KEY_ID_KEY
-- A container's claim that its data disproved, and the engine's own figure where it differs
-- from the edge's: either sends the request's log as a mismatch, which the control plane
-- counts, the engine's figure correcting what was metered (control_plane/observe/access_logs.py).
local CLAIMED_KEY, ENGINE_SECONDS_KEY = NAMES.CLAIMED_KEY, NAMES.ENGINE_SECONDS_KEY
-- Set on a figure checked against the data (audio_duration's): its answer's body is not read.
local CHECKED_KEY = NAMES.CHECKED_KEY
-- A recording routed to a longform worker (routing.lua), and the seconds its worker decoded.
local LONGFORM_KEY, RECORDING_SECONDS_HEADER = NAMES.LONGFORM_KEY, NAMES.RECORDING_SECONDS_HEADER
-- A recording streamed to its worker unread (longform.lua), and the model its answer names.
local STREAMED_KEY, RECORDING_MODEL_HEADER = NAMES.STREAMED_KEY, NAMES.RECORDING_MODEL_HEADER

-- Seconds of audio in the upload (envoy/audio_duration.lua), as headers the engines and the
-- upload's tries' logs see (a 2xx try's end meters it), and as dynamic metadata for the log of
-- failed requests.
local function measure_audio(h, headers, body, file, model)
  local seconds, estimated, claimed, checked = audio_duration.audio_duration(
    function(offset, n) return body:getBytes(file.start + offset, n) end,
    file.stop - file.start, file.filename, CONTEXT.max_audio_seconds or math.huge)
  local shown = string.format("%.3f", seconds)
  headers:replace(AUDIO_SECONDS_HEADER, shown)
  if estimated then headers:replace(AUDIO_ESTIMATED_HEADER, "1") end
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, MODEL_KEY, model)
  metadata:set(METADATA_NAMESPACE, SECONDS_KEY, shown)
  if estimated then metadata:set(METADATA_NAMESPACE, ESTIMATED_KEY, "1") end
  if claimed then metadata:set(METADATA_NAMESPACE, CLAIMED_KEY, string.format("%.3f", math.max(0, claimed))) end
  if checked then metadata:set(METADATA_NAMESPACE, CHECKED_KEY, "1") end
  return seconds
end

-- The engine's own duration in a JSON answer: vLLM's `usage.seconds` (json: whole seconds,
-- rounded up; the last one, the top level's) or verbose_json's `duration`. A transcript's own
-- quotes are escaped, so its text cannot pass for either.
local function engine_seconds(text)
  local last
  for value in text:gmatch('"usage"%s*:%s*{[^{}]-"seconds"%s*:%s*(%d+%.?%d*)') do last = value end
  if last then return tonumber(last), true end
  return tonumber(text:match('"duration"%s*:%s*(%d+%.?%d*)')), false
end

-- Whether the engine's figure contradicts the edge's: usage.seconds is the duration rounded up
-- to a whole second, so the edge's must lie in (seconds - 1, seconds]; a duration must be within
-- 1%; either with 50 ms to spare.
local function contradicts(edge, engine, whole)
  if whole then return edge > engine + 0.05 or edge < engine - 1.05 end
  return math.abs(edge - engine) > 0.01 * engine + 0.05
end

-- A JSON answer larger than this is not read: Envoy buffers what the filter reads within its
-- connection buffer limit (1 MiB), and a 500 for an answer already made is worse than the edge's figure.
local MAX_ANSWER_BYTES = 524288

-- The reconciling step, after a routed request's whole 2xx JSON answer whose audio the edge
-- could not check against the data (a header's claim, or an estimate): where the engine's figure
-- contradicts the edge's, it goes to the request's log. Streamed (SSE) and plain-text answers carry none: the edge's stands.
-- The engine's figure where it contradicts the edge's, bounded as the edge's is, into the metadata.
local function corrected(h, edge, engine, whole)
  if engine and contradicts(edge, engine, whole) then
    local limit = CONTEXT.max_audio_seconds or math.huge -- the engine's figure is bounded as the edge's is
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, ENGINE_SECONDS_KEY,
      string.format("%.3f", math.min(engine, limit)))
  end
end

local function reconcile(h)
  local headers = h:headers()
  local status, content_type = headers:get(":status") or "", headers:get("content-type") or ""
  if status:sub(1, 1) ~= "2" then return end
  local fields = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
  if fields and fields[LONGFORM_KEY] then
    -- A recording at a longform worker: the seconds its worker decoded, whatever the format or the
    -- answer's size (streamed too), stand for what the edge could only claim or estimate.
    local decoded = tonumber(headers:get(RECORDING_SECONDS_HEADER) or "")
    local model = headers:get(RECORDING_MODEL_HEADER)
    headers:remove(RECORDING_SECONDS_HEADER)
    headers:remove(RECORDING_MODEL_HEADER)
    if fields[STREAMED_KEY] then
      -- Streamed to its worker unread (longform.lua): the edge measured nothing, and the request's
      -- log meters what the answer says, bounded: a model this gateway serves, max_audio_seconds.
      if decoded and model and (CONTEXT.models or {})[model] == model then
        local metadata = h:streamInfo():dynamicMetadata()
        metadata:set(METADATA_NAMESPACE, MODEL_KEY, model)
        metadata:set(METADATA_NAMESPACE, SECONDS_KEY,
          string.format("%.3f", math.min(math.max(decoded, 0), CONTEXT.max_audio_seconds or math.huge)))
      end
      return
    end
    local edge = tonumber(fields[SECONDS_KEY])
    if edge then corrected(h, edge, decoded, false) end
    return
  end
  if not content_type:find("application/json", 1, true) then return end
  local length = tonumber(headers:get("content-length") or "")
  if not length or length > MAX_ANSWER_BYTES then return end -- a chunked or large answer: not buffered
  local edge = fields and tonumber(fields[SECONDS_KEY])
  if not edge or fields[CHECKED_KEY] then return end -- not routed here, or measured from the data itself
  local body = h:body()
  if body == nil then return end
  corrected(h, edge, engine_seconds(body:getBytes(0, body:length())))
end

-- The metering step: the key's id (a grant, or false without keys), then the upload's
-- audio-seconds, which it returns; `form` is multipart.read_form's.
-- The key a request is metered to (a grant, or false without keys), for its logs and its engine.
local function identify(h, headers, grant)
  if grant then
    headers:replace(KEY_ID_HEADER, grant.id)
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, KEY_ID_KEY, grant.id)
  end
end

local function meter(h, headers, body, form, grant, model)
  identify(h, headers, grant)
  return measure_audio(h, headers, body, form.file, model)
end

return {meter = meter, identify = identify, reconcile = reconcile}
