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

-- Seconds of audio in the upload (envoy/audio_duration.lua), as headers the engines and the
-- upload's tries' logs see (a 2xx try's end meters it), and as dynamic metadata for the log of
-- failed requests.
local function measure_audio(h, headers, body, file, model)
  local seconds, estimated = audio_duration.audio_duration(
    function(offset, n) return body:getBytes(file.start + offset, n) end,
    file.stop - file.start, file.filename, CONTEXT.max_audio_seconds or math.huge)
  local shown = string.format("%.3f", seconds)
  headers:replace(AUDIO_SECONDS_HEADER, shown)
  if estimated then headers:replace(AUDIO_ESTIMATED_HEADER, "1") end
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, MODEL_KEY, model)
  metadata:set(METADATA_NAMESPACE, SECONDS_KEY, shown)
  if estimated then metadata:set(METADATA_NAMESPACE, ESTIMATED_KEY, "1") end
  return seconds
end

-- The metering step: the key's id (a grant, or false without keys), then the upload's
-- audio-seconds, which it returns; `form` is multipart.read_form's.
local function meter(h, headers, body, form, grant, model)
  if grant then
    headers:replace(KEY_ID_HEADER, grant.id)
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, KEY_ID_KEY, grant.id)
  end
  return measure_audio(h, headers, body, form.file, model)
end

return {meter = meter}
