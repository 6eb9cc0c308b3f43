-- whisper-gateway: uploads too large to buffer. One that declares more than limits.max_upload_mb
-- (its Content-Length), up to max_longform_mb, is never read here: once its key is admitted it
-- streams to a longform worker, which spools it to disk and then asks the pieces listener to
-- admit the rest (its model, the key's access and plan) before any piece goes out.

local reply = openai_errors.reply
local METADATA_NAMESPACE = NAMES.METADATA_NAMESPACE
local LONGFORM_HEADER, LONGFORM_PARALLEL_HEADER = NAMES.LONGFORM_HEADER, NAMES.LONGFORM_PARALLEL_HEADER
local ADMIT_MODEL_HEADER, ADMIT_KEY_HEADER = NAMES.ADMIT_MODEL_HEADER, NAMES.ADMIT_KEY_HEADER
local PER_TRY_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"

-- The streaming step, on the audio listener after the key step (`grant`: false without keys):
-- false when the upload is buffered like any other (no longform workers, no Content-Length, or
-- within max_upload_bytes); nil once it answered (413 past max_longform_bytes, or the key's plan
-- refused it); true when it goes to a worker unread. Its length is unknown until its worker has
-- decoded it: the key is charged one audio-second now, the rest once its answer is metered
-- (control_plane/observe/access_logs.py), and its worker's admission (below) checks the plan.
local function stream(h, headers, grant)
  if (CONTEXT.longform_above_s or 0) <= 0 then return false end
  local length = tonumber(headers:get("content-length") or "")
  if not length or length <= (CONTEXT.max_upload_bytes or math.huge) then return false end
  local most = CONTEXT.max_longform_bytes or 0
  if length > most then
    return reply(h, 413, string.format("Request body is larger than the gateway's limit of %g MiB for long recordings.",
      most / 1048576), "RequestTooLargeError", "file")
  end
  if not plans.charge(h, grant, 0) then return nil end
  metering.identify(h, headers, grant)
  headers:replace(LONGFORM_HEADER, NAMES.LONGFORM_STREAMED)
  headers:replace(NAMES.AUDIO_SECONDS_HEADER, "0.000") -- the one audio-second charged, as the logs count it
  headers:remove(PER_TRY_HEADER)
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, NAMES.LONGFORM_KEY, "1")
  metadata:set(METADATA_NAMESPACE, NAMES.STREAMED_KEY, "1")
  metadata:set(METADATA_NAMESPACE, NAMES.SECONDS_KEY, "0.000")
  h:clearRouteCache()
  return true
end

-- Grants by key id, made once per Lua state (a key made or revoked is a new route configuration).
local grants_by_id
local function grant_of(id)
  if grants_by_id == nil then
    grants_by_id = {}
    for _, grant in pairs(KEY_GRANTS) do grants_by_id[grant.id] = grant end
  end
  return grants_by_id[id]
end

-- The admission step, on the pieces listener: a worker's question about an upload it spooled,
-- whose model (ADMIT_MODEL_HEADER) and length (RECORDING_SECONDS_HEADER) it has read, sent with
-- the key's id (ADMIT_KEY_HEADER): answered as the upload itself would have been here (404, 403,
-- 429), else 204 with the model's own name and how many of its pieces may be at its engines at once.
local function admit(h, headers)
  local grant = false
  if CONTEXT.keys_required then
    grant = grant_of(headers:get(ADMIT_KEY_HEADER) or "")
    if grant == nil then
      return reply(h, 401, "The API key was revoked while its upload was sent.", "AuthenticationError", nil,
        "invalid_api_key")
    end
  end
  local model = models.resolve(h, headers:get(ADMIT_MODEL_HEADER) or "", grant)
  if not model then return nil end
  local seconds = math.min(math.max(tonumber(headers:get(NAMES.RECORDING_SECONDS_HEADER) or "") or 0, 0),
    CONTEXT.max_audio_seconds or math.huge)
  if not lanes.assign(h, headers, grant, model) or not plans.charge(h, grant, seconds) then return nil end
  h:respond({[":status"] = "204", [NAMES.MODEL_HEADER] = model, -- its own name, where the form named an alias
    [LONGFORM_PARALLEL_HEADER] = tostring((CONTEXT.longform_parallel or {})[model] or 1)}, "")
  return nil
end

return {stream = stream, admit = admit}
