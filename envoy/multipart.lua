-- whisper-gateway: the multipart form of a transcription request, read from its buffered body.
--
-- Uploads are large and the fields are small, so this copies a small window at each end of the
-- body first, and the whole body only when the fields are not in either window (a multipart
-- boundary never occurs inside a part, so any delimiter found in a window is a real one).

local reply, bad_request = openai_errors.reply, openai_errors.bad_request
local release = uploads.release

local WINDOW = 4096
local MAX_MODEL_BYTES = 256
-- A part's header block: engines' form parsers fail (HTTP 500) on huge or binary ones.
local MAX_PART_HEADER_BYTES = 8192
local PART_HEADER_CONTROL = "[%z\1-\8\11\12\14-\31\127]"

local find, sub, lower = string.find, string.sub, string.lower

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

-- Why the form cannot be transcribed and the field that is wrong (the error's `param`), or nil.
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

-- The first step of the form: its boundary, from a POST's multipart/form-data Content-Type;
-- nil once it answered (405 to another method, 400 to another body).
local function request_boundary(h, headers)
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
  return boundary
end

-- The form in the buffered `body` (h:body(): nil without one): the `model` field's value
-- (model_name) and where it is (model), and where the file is (file: start, stop, filename), as
-- 0-based body offsets, stop exclusive; nil once it answered 400.
local function read_form(h, body, boundary)
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
  local file = count(parts, "file")[1]
  return {model_name = name, model = {start = part.start, stop = part.stop},
    file = {start = file.start, stop = value_end(file, parts) or body:length(), filename = file.filename}}
end

return {request_boundary = request_boundary, read_form = read_form}
