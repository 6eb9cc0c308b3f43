-- whisper-gateway: the Lua filter's entry points, composed of the other modules' steps.
--
-- The filter is one source: control_plane/bootstrap.py joins envoy/<module>.lua in LUA_MODULES'
-- order, each file's body its own function whose returned table (its exports) becomes a local
-- named after the module, so a module reads an earlier one only through what it exports. Ahead of
-- them the control plane writes the values they need as constants
-- (control_plane/builders/lua_source.py): CONTEXT, the routing values (models = {name or alias
-- -> model}, ...), KEY_GRANTS, and NAMES, the names shared with the control plane (headers,
-- metadata keys, limits: control_plane/names.py LUA_NAMES), so none is typed here.
--
-- A step either answers the request itself (h:respond: Envoy never resumes the script after it)
-- and returns nil, or returns what the steps after it need (true when nothing).

function envoy_on_request(h)
  local headers = h:headers()
  -- A piece of a recording this gateway admitted and charged once, as a whole: no key of its own.
  local piece = routing.is_piece(h)
  if not routing.first_pass(h, headers, piece) then return end
  if piece and headers:get(NAMES.ADMIT_MODEL_HEADER) then return longform.admit(h, headers) end -- a worker asks
  local grant = false
  if not piece then
    grant = api_keys.admit(h, headers) -- before the body: a stranger's upload is never buffered
    if grant == nil then return end -- false: no key is required
    if longform.stream(h, headers, grant) ~= false then return end -- too large to buffer: to a worker unread
  end
  local boundary = multipart.request_boundary(h, headers)
  if not boundary then return end -- its memory was admitted by the listener's filter, below
  local body = h:body()
  headers = h:headers() -- h:body() yields: handles taken before it are no longer valid
  local form = multipart.read_form(h, body, boundary)
  local model = form and models.resolve(h, form.model_name, grant)
  if not model then return end
  local seconds = metering.meter(h, headers, body, form, grant, model) -- before an alias moves the bytes
  if not lanes.assign(h, headers, grant, model) or not plans.charge(h, grant, seconds) then return end
  models.rewrite_alias(body, form, model)
  routing.route(h, headers, body, model, seconds, piece)
end

-- The listener's upload-admission filter (control_plane/builders/listener.py) runs this source
-- too, before the routes' one, for that alone: a POST's memory, admitted before a byte of it is
-- buffered. No route overrides that filter, so its count of what uploads hold lives as long as
-- the listener, while every route update starts the routes' Lua states afresh.
if CONTEXT.upload_admission then
  function envoy_on_request(h) uploads.admit(h, h:headers()) end
end

-- The pieces listener's first filter runs this source too (control_plane/builders/listener.py),
-- to mark what comes in there as a piece of a recording (routing.lua).
if CONTEXT.piece_marker then
  function envoy_on_request(h) routing.mark_piece(h) end
end

-- Every routed request's answer: OpenAI's rate-limit headers where plans are enforced, a
-- piece's share (headers first: reading the body yields), then the engine's own figure of its audio.
local with_plans = CONTEXT.keys_required and next(CONTEXT.plans or {}) ~= nil
local with_longform = (CONTEXT.longform_above_s or 0) > 0
if not (CONTEXT.upload_admission or CONTEXT.piece_marker) then
  function envoy_on_response(h)
    if with_plans then plans.rate_limit_headers(h) end
    if with_longform then routing.tell_parallel(h) end -- a piece's answer: its recording's share now
    metering.reconcile(h)
  end
end

-- Its exports are the globals Envoy calls.
return {}
