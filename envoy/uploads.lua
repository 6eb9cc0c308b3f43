-- whisper-gateway: the memory uploads hold in Envoy: admitted before a byte is buffered, and
-- copies of a body collected at once.

local reply = openai_errors.reply
-- How many worker threads Envoy runs (control_plane/supervisor.py sets it).
local WORKERS_ENV = NAMES.WORKERS_ENV

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
  if budget <= 0 or headers:get(":method") ~= "POST" then return true end -- only a POST carries an upload
  -- Where keys are required, a request without one is refused at its headers (api_keys.lua), its
  -- body never buffered: it holds nothing, so a stranger cannot fill the share with such requests.
  if CONTEXT.keys_required and not (headers:get("authorization") or ""):find("^%s*[Bb]earer%s+%S") then
    return true
  end
  local limit = CONTEXT.max_upload_bytes or math.huge
  local declared = tonumber(headers:get("content-length") or "")
  local bytes = math.min(declared or limit, limit) * (CONTEXT.upload_copies or 1)
  local streamed = CONTEXT.streamed_upload_bytes or 0 -- one larger goes to a longform worker unbuffered
  if streamed > 0 and declared and declared > limit then bytes = streamed end
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

-- The admission step: true when the upload may be buffered (its memory reserved); nil once it
-- answered 503.
local function admit(h, headers)
  if reserve_upload(h, headers) then return true end
  return reply(h, 503, "The gateway holds as many uploads in flight as its memory allows "
    .. "(limits.max_heap_mb); retry shortly.", "ServiceUnavailableError", nil, nil, 1)
end

return {admit = admit, release = release}
