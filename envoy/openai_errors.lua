-- whisper-gateway: the Lua filter's own answers, in OpenAI's error shape.

-- Dynamic metadata (a client cannot forge it): LUA_REPLY_KEY marks the filter's own answers so
-- Envoy's local-reply mapper leaves them as they are; its value, the answer's code, shows in traces.
local METADATA_NAMESPACE = NAMES.METADATA_NAMESPACE
local LUA_REPLY_KEY = NAMES.LUA_REPLY_KEY

local function json_string(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", string.byte(c))
  end)
  -- Error messages echo client bytes; keep the JSON valid whatever they were.
  return '"' .. s:gsub("[\128-\255]", "?") .. '"'
end

-- An OpenAI-style error, the shape of control_plane/openai_errors.py (tests/test_names_agree.py holds the
-- two to it); `code` is the status unless OpenAI names one (invalid_api_key). h:respond ends the
-- script (Envoy never resumes it), so a step that answers returns nil: `return reply(...)`.
local function reply(h, status, message, error_type, param, code, retry_after)
  local body = '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(error_type)
    .. ',"param":' .. (param and json_string(param) or "null") .. ',"code":' .. (code and json_string(code) or status)
    .. "}}"
  h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, LUA_REPLY_KEY, code or tostring(status))
  h:respond({[":status"] = tostring(status), ["content-type"] = "application/json",
    ["retry-after"] = retry_after and tostring(retry_after) or nil}, body)
end

local function bad_request(h, message, param)
  return reply(h, 400, message, "BadRequestError", param)
end

return {reply = reply, bad_request = bad_request}
