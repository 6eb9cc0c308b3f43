-- whisper-gateway: routes an OpenAI-style multipart audio request by its `model` form field.
--
-- Envoy matches routes on headers, but the model is a field of the multipart body. This filter
-- buffers the body (retries need it buffered anyway), finds the `model` part, and sets
-- x-whisper-model, which the routes match. Uploads are large and the field is small, so it
-- copies a small window at each end of the body first, and the whole body only when the field
-- is not in either window (a multipart boundary never occurs inside a part, so any delimiter
-- found in a window is a real one). The names clients may use come from the virtual host's
-- filter_context: models = {name or alias -> model}.

local MODEL_HEADER = "x-whisper-model"
local WINDOW = 4096
local MAX_MODEL_BYTES = 256

local find, sub, lower = string.find, string.sub, string.lower

local function json_string(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", string.byte(c))
  end)
  -- Error messages echo client bytes; keep the JSON valid whatever they were.
  return '"' .. s:gsub("[\128-\255]", "?") .. '"'
end

local function reply(h, status, message, error_type, param)
  local body = '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(error_type)
    .. ',"param":' .. (param and json_string(param) or "null") .. ',"code":' .. status .. "}}"
  h:respond({[":status"] = tostring(status), ["content-type"] = "application/json"}, body)
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

-- The `name` parameter of a part's Content-Disposition header (not the tail of `filename`).
local function part_name(headers)
  local lowered = lower(headers)
  local start = find(lowered, "content%-disposition:")
  if not start then return nil end
  local line_end = find(headers, "\r\n", start, true) or (#headers + 1)
  local line = sub(headers, start, line_end - 1)
  local _, e = find(lower(line), "[;%s]name%s*=%s*")
  if not e then return nil end
  local rest = sub(line, e + 1)
  if sub(rest, 1, 1) == '"' then return rest:match('^"([^"]*)"') end
  return rest:match("^([^;%s]+)")
end

-- Appends to `found` the body positions {start, stop} (0-based, stop exclusive) of every
-- complete `model` value in `s`, a piece of the body that starts at body offset `base`.
-- Returns true when a part of interest runs past the end of the piece.
local function scan(s, delim, base, found)
  local pos = 1
  while true do
    local d = find(s, delim, pos, true)
    if not d then return false end
    local after = d + #delim
    if d == 1 or sub(s, d - 2, d - 1) == "\r\n" then
      if sub(s, after, after + 1) == "--" then return false end -- the closing delimiter
      local header_end = find(s, "\r\n\r\n", after, true)
      if not header_end then return true end
      local value_start = header_end + 4
      if part_name(sub(s, after, header_end - 1)) == "model" then
        local value_end = find(s, "\r\n" .. delim, value_start, true)
        if not value_end then return true end
        found[#found + 1] = {base + value_start - 1, base + value_end - 1}
        pos = value_end + 2
      else
        pos = value_start
      end
    else
      pos = after
    end
  end
end

local function model_positions(body, delim)
  local length = body:length()
  local found = {}
  if length <= 2 * WINDOW then
    scan(body:getBytes(0, length), delim, 0, found)
    return found
  end
  local cut = scan(body:getBytes(0, WINDOW), delim, 0, found)
  cut = scan(body:getBytes(length - WINDOW, WINDOW), delim, length - WINDOW, found) or cut
  if cut or #found == 0 then
    found = {}
    scan(body:getBytes(0, length), delim, 0, found)
  end
  return found
end

local function served_names(models)
  local names = {}
  for name, _ in pairs(models) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, ", ")
end

function envoy_on_request(h)
  local headers = h:headers()
  if headers:get(":method") ~= "POST" then
    return reply(h, 405, "Method Not Allowed: send POST with a multipart/form-data body.",
      "MethodNotAllowed", nil)
  end
  local content_type = headers:get("content-type")
  local boundary = content_type and boundary_of(content_type)
  if not boundary then
    return reply(h, 400, "Expected a multipart/form-data body with a boundary; Content-Type was "
      .. (content_type or "missing") .. ".", "BadRequestError", nil)
  end
  local body = h:body()
  -- h:body() yields: handles taken before it are no longer valid.
  if body == nil or body:length() == 0 then
    return reply(h, 400, "Missing form field `model` (the request has no body).", "BadRequestError", "model")
  end
  local found = model_positions(body, "--" .. boundary)
  if #found == 0 then
    return reply(h, 400, "Missing form field `model`.", "BadRequestError", "model")
  end
  if #found > 1 then
    return reply(h, 400, "The form field `model` is given more than once.", "BadRequestError", "model")
  end
  local start, stop = found[1][1], found[1][2]
  if stop == start then
    return reply(h, 400, "The form field `model` is empty.", "BadRequestError", "model")
  end
  if stop - start > MAX_MODEL_BYTES then
    return reply(h, 400, "The form field `model` is longer than " .. MAX_MODEL_BYTES .. " bytes.",
      "BadRequestError", "model")
  end
  local name = body:getBytes(start, stop - start)
  if find(name, "%c") then
    return reply(h, 400, "The form field `model` contains control characters.", "BadRequestError", "model")
  end
  local models = h:filterContext():get("models") or {}
  local model = models[name]
  if model == nil then
    return reply(h, 404, "The model `" .. name .. "` does not exist. Served models: " .. served_names(models) .. ".",
      "NotFoundError", "model")
  end
  if model ~= name then
    -- An alias: engines know only the model's own name, so the form must carry that.
    local whole = body:getBytes(0, body:length())
    body:setBytes(sub(whole, 1, start) .. model .. sub(whole, stop + 1))
  end
  h:headers():replace(MODEL_HEADER, model)
  h:clearRouteCache()
end
