"""The gateway's Lua filter in-process: the source Envoy gets, run by LuaJIT 2.1 with a stub of
Envoy's handle API, in microseconds rather than through a running Envoy.

The source is built exactly as the control plane builds it (filter_source over read_lua_filter,
with lua_context's CONTEXT and the access's KEY_GRANTS), so the real envoy/*.lua files run; one
line added after it returns the modules' tables, so a test reaches a module's exports by name
(LuaFilter.module) and calls one with a request's handle (LuaFilter.call). The stub (STUB
below, in Lua) does what Envoy 1.40's Lua filter does with what those files call: headers get
(all values joined by ","), getAtIndex, getNumValues, add, replace (every value replaced by
one), remove, pairs; body() (nil without a body) as a buffer whose getBytes raises
Envoy's error when index or length is negative or the range passes the end, and whose setBytes
sets content-length; streamInfo() with dynamicMetadata() set/get and downstreamRemoteAddress();
respond(), which ends the script as Envoy's yield does; clearRouteCache(); timestamp() (ms, a
clock the caller sets); log*(). It records what the filter did: the local reply, the request
headers and body it leaves, the dynamic metadata, whether the route cache was cleared, whether
body() was called, and every misuse of the API, even one a pcall in the filter swallowed.

Each LuaFilter is one Lua state, as each Envoy worker has one: counts the filter keeps between
requests (wrong keys per address) last as long as it does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from control_plane.bootstrap import LUA_MODULES, read_lua_filter
from control_plane.builders.lua_source import filter_source
from control_plane.builders.routes import lua_context
from control_plane.builders.listener import upload_admission_context
from control_plane.config import GatewayConfig, parse_config
from control_plane.fleet.resolved import Fleet
from control_plane.tenants.keys import Access

try:  # LuaJIT 2.1, the VM family of Envoy's Lua filter (/work/shared/TOOLING_FACTS.md)
    from lupa import luajit21 as _lupa
except ImportError as error:  # pragma: no cover - says what to install
    raise ImportError("the Lua filter tests need lupa with LuaJIT 2.1 (pip install lupa; pyproject's test extra)") \
        from error

ENCODING = "latin-1"  # Lua strings <-> Python str byte for byte
AUDIO_PATH = "/v1/audio/transcriptions"

STUB = r"""
local STUB = {}
local find, lower = string.find, string.lower

local function stub_error(record, message)
  record.violations[#record.violations + 1] = message
  error(message, 3)
end

-- luaL_checkstring: a string, or a number made one; anything else is an error.
local function checkstring(record, value, what)
  if type(value) == "number" then return tostring(value) end
  if type(value) ~= "string" then stub_error(record, what .. ": string expected, got " .. type(value)) end
  return value
end

local function checkint(record, value, what)
  if type(value) ~= "number" or value ~= value then stub_error(record, what .. ": number expected") end
  if value ~= math.floor(value) then -- Envoy truncates; a filter never means to pass one
    record.violations[#record.violations + 1] = what .. ": not an integer (" .. value .. ")"
  end
  return value >= 0 and math.floor(value) or math.ceil(value)
end

-- A header map: an ordered list of {name, value}, names lowercased as Envoy's LowerCaseString does.
local Headers = {}
Headers.__index = Headers

local function new_headers(record, list, modifiable)
  return setmetatable({record = record, list = list, modifiable = modifiable}, Headers)
end

local function check_modifiable(self)
  if self.iterating then stub_error(self.record, "header map cannot be modified while iterating") end
  if not self.modifiable() then stub_error(self.record, "header map can no longer be modified") end
end

local function valid_value(self, value)
  if find(value, "[%z\r\n]") then stub_error(self.record, "header value with NUL, CR or LF: " .. string.format("%q", value)) end
  return value
end

function Headers:get(name)
  name = lower(checkstring(self.record, name, "headers:get"))
  local values = {}
  for _, entry in ipairs(self.list) do
    if entry[1] == name then values[#values + 1] = entry[2] end
  end
  if #values == 0 then return nil end
  return table.concat(values, ",")
end

function Headers:getAtIndex(name, index)
  name = lower(checkstring(self.record, name, "headers:getAtIndex"))
  index = checkint(self.record, index, "headers:getAtIndex")
  local seen = 0
  for _, entry in ipairs(self.list) do
    if entry[1] == name then
      if seen == index then if entry[2] == "" then return nil end return entry[2] end
      seen = seen + 1
    end
  end
  return nil
end

function Headers:getNumValues(name)
  name = lower(checkstring(self.record, name, "headers:getNumValues"))
  local n = 0
  for _, entry in ipairs(self.list) do if entry[1] == name then n = n + 1 end end
  return n
end

function Headers:remove(name)
  check_modifiable(self)
  name = lower(checkstring(self.record, name, "headers:remove"))
  local present = false
  for _, entry in ipairs(self.list) do if entry[1] == name then present = true; break end end
  if not present then return end
  local kept = {}
  for _, entry in ipairs(self.list) do if entry[1] ~= name then kept[#kept + 1] = entry end end
  self.list = kept
  self.record.headers = kept
end

function Headers:add(name, value)
  check_modifiable(self)
  name = lower(checkstring(self.record, name, "headers:add"))
  value = valid_value(self, checkstring(self.record, value, "headers:add"))
  self.list[#self.list + 1] = {name, value}
end

-- setCopy: every value of the name removed, the one value added.
function Headers:replace(name, value)
  check_modifiable(self)
  name = lower(checkstring(self.record, name, "headers:replace"))
  value = valid_value(self, checkstring(self.record, value, "headers:replace"))
  self:remove(name)
  self.list[#self.list + 1] = {name, value}
end

Headers.__pairs = function(self)
  if self.iterating then stub_error(self.record, "cannot create a second iterator before completing the first") end
  local i, snapshot = 0, {}
  for k, entry in ipairs(self.list) do snapshot[k] = entry end
  self.iterating = true
  return function()
    i = i + 1
    local entry = snapshot[i]
    if entry == nil then self.iterating = false; return nil end
    return entry[1], entry[2]
  end, self, nil
end

-- The buffered body: Envoy's BufferWrapper.
local Buffer = {}
Buffer.__index = Buffer

function Buffer:length() return #self.record.body end

function Buffer:getBytes(index, length)
  local record = self.record
  index = checkint(record, index, "body:getBytes index")
  length = checkint(record, length, "body:getBytes length")
  local size = #record.body
  if index < 0 or length < 0 or index + length > size then
    stub_error(record, "index/length must be >= 0 and (index + length) must be <= buffer size"
      .. " (index " .. index .. ", length " .. length .. ", size " .. size .. ")")
  end
  record.bytes_read = record.bytes_read + length
  return string.sub(record.body, index + 1, index + length)
end

function Buffer:setBytes(bytes)
  local record = self.record
  record.body = checkstring(record, bytes, "body:setBytes")
  record.body_set = true
  record.handle_headers:replace("content-length", tostring(#record.body))
  return #record.body
end

local function metadata_value(value)
  if type(value) == "table" then
    local copy = {}
    for k, v in pairs(value) do copy[k] = metadata_value(v) end
    return copy
  end
  return value
end

local function new_stream_info(record)
  local metadata = {
    set = function(_, namespace, key, value)
      namespace = checkstring(record, namespace, "dynamicMetadata:set namespace")
      key = checkstring(record, key, "dynamicMetadata:set key")
      local t = type(value)
      if t ~= "nil" and t ~= "number" and t ~= "boolean" and t ~= "string" and t ~= "table" then
        stub_error(record, "unexpected type '" .. t .. "' in dynamicMetadata")
      end
      record.metadata[namespace] = record.metadata[namespace] or {}
      record.metadata[namespace][key] = metadata_value(value)
    end,
    get = function(_, namespace)
      namespace = checkstring(record, namespace, "dynamicMetadata:get")
      local fields = record.metadata[namespace]
      if fields == nil then return nil end
      return metadata_value(fields)
    end,
  }
  return {
    dynamicMetadata = function() return metadata end,
    downstreamRemoteAddress = function() return record.remote_address end,
  }
end

local RESPONDED = {}

-- A handle for one direction: `record` holds the request and what the filter does with it.
local function new_handle(record, direction)
  local headers = new_headers(record, record.headers, function() return not record.responded end)
  record.handle_headers = headers
  local stream_info = new_stream_info(record)
  local body = setmetatable({record = record}, Buffer)
  local h = {}
  function h:headers() return headers end
  function h:body(always_wrap)
    record.body_calls = record.body_calls + 1
    if record.body == nil then
      if always_wrap then record.body = "" else return nil end
    end
    return body
  end
  function h:streamInfo() return stream_info end
  function h:timestamp() return record.now_ms end
  function h:clearRouteCache() record.route_cache_cleared = true end
  function h:respond(reply_headers, reply_body)
    if direction ~= "request" then stub_error(record, "respond() is only for requests here") end
    if type(reply_headers) ~= "table" then stub_error(record, "respond: headers table expected") end
    local copied = {}
    for k, v in pairs(reply_headers) do
      copied[lower(checkstring(record, k, "respond header name"))] = checkstring(record, v, "respond header value")
    end
    local status = tonumber(copied[":status"] or "")
    if status == nil or status < 200 or status >= 600 or status ~= math.floor(status) then
      stub_error(record, ":status must be between 200-599")
    end
    record.responded = true
    record.reply_headers = copied
    record.reply_body = reply_body ~= nil and checkstring(record, reply_body, "respond body") or nil
    coroutine.yield(RESPONDED) -- Envoy's respond() yields, and the script never resumes
    stub_error(record, "the script resumed after respond()")
  end
  for _, level in ipairs({"Trace", "Debug", "Info", "Warn", "Err", "Critical"}) do
    h["log" .. level] = function(_, message)
      record.logs[#record.logs + 1] = {level, checkstring(record, message, "log" .. level)}
    end
  end
  return h
end

-- A fresh record of a request: `headers` a list of {name, value}, `body` a string or nil.
function STUB.record(headers, body, remote_address, now_ms)
  local list = {}
  for _, entry in ipairs(headers) do list[#list + 1] = {lower(entry[1]), entry[2]} end
  return {headers = list, body = body, remote_address = remote_address, now_ms = now_ms, metadata = {},
          logs = {}, violations = {}, body_calls = 0, bytes_read = 0, route_cache_cleared = false,
          responded = false, body_set = false}
end

-- Runs `entry` (envoy_on_request or envoy_on_response) as Envoy does: in a coroutine.
-- record.error: a Lua error that escaped the script (Envoy logs "script log" and goes on).
function STUB.run(entry, record, direction)
  if entry == nil then record.error = "no envoy_on_" .. direction .. " in the filter"; return record end
  local co = coroutine.create(entry)
  -- The handle lives as long as the record (Envoy's: as long as the stream): Outcome.stream.
  record.handle = new_handle(record, direction)
  local ok, result = coroutine.resume(co, record.handle)
  if not ok then
    record.error = debug.traceback(co, tostring(result))
  elseif coroutine.status(co) ~= "dead" and result ~= RESPONDED then
    record.error = "the script yielded without responding"
  end
  return record
end

return STUB
"""


@dataclass
class Outcome:
    """What the filter did with one request (or response)."""

    error: str | None  # a Lua error that escaped the script, with its traceback
    status: int | None  # the local reply's status; None: the request goes on to the router
    reply_headers: dict[str, str]
    reply_body: bytes | None
    headers: list[tuple[str, str]]  # the request's (or response's) headers as the filter left them
    body: bytes | None  # the request body as the filter left it
    metadata: dict[str, dict[str, Any]]  # dynamic metadata by namespace
    route_cache_cleared: bool
    body_calls: int  # how many times h:body() was called (0: the body was never read)
    bytes_read: int  # bytes copied out of the body by getBytes
    body_set: bool  # whether body:setBytes replaced it
    logs: list[tuple[str, str]]
    violations: list[str] = field(default_factory=list)  # misuses of Envoy's API, swallowed by a pcall or not
    # The request's stream, with the handle the filter had: held, it is in flight; end_stream()
    # lets it go (as Envoy does when a stream ends, however it ends).
    stream: Any = field(default=None, repr=False)

    def end_stream(self) -> None:
        self.stream = None

    @property
    def routed(self) -> bool:
        return self.error is None and self.status is None

    @property
    def json(self) -> dict:
        return json.loads(self.reply_body)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ",".join(values) if values else None

    def header_count(self, name: str) -> int:
        return sum(1 for k, _ in self.headers if k == name.lower())


def _to_python(value):
    """A Lua value as Python (tables as dicts, or lists when keyed 1..n)."""
    if _lupa.lua_type(value) == "table":
        items = dict(value.items())
        if items and all(isinstance(k, int) for k in items) and sorted(items) == list(range(1, len(items) + 1)):
            return [_to_python(items[k]) for k in range(1, len(items) + 1)]
        return {k: _to_python(v) for k, v in items.items()}
    return value


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode(ENCODING) if isinstance(value, str) else value


class LuaFilter:
    """The filter as Envoy gets it for `config`, `fleet` and `access`, in one Lua state; with
    `admission`, the listener's upload-admission filter instead (builders/listener.py)."""

    def __init__(self, config: GatewayConfig, fleet: Fleet | None = None, access: Access = Access(),
                 envoys: int = 1, now_ms: int = 1_800_000_000_000, admission: bool = False):
        fleet = fleet if fleet is not None else Fleet(models=config.models, backends=())
        self.config, self.fleet, self.access = config, fleet, access
        self.context = upload_admission_context(config) if admission else lua_context(config, fleet, access, envoys)
        self.source = filter_source(read_lua_filter(), self.context, access)
        self.now_ms = now_ms
        self.lua = _lupa.LuaRuntime(encoding=ENCODING, unpack_returned_tuples=True)
        load = self.lua.eval("function(source, name) return assert(loadstring(source, name)) end")
        # The modules' tables, returned by a line added after the source (Envoy's copy returns nothing).
        exports = "\nreturn {" + ", ".join(f"{name} = {name}" for name in LUA_MODULES) + "}"
        self.modules = load(self.source + exports, "=whisper-gateway-lua-filter")()
        self.stub = load(STUB, "=harness/lua_filter.py stub")()

    @classmethod
    def from_raw(cls, raw: dict, access: Access = Access(), **options) -> "LuaFilter":
        return cls(parse_config(raw), access=access, **options)

    def module(self, name: str):
        """A module's exports (envoy/<name>.lua's returned table, e.g. module("audio_duration").audio_duration)."""
        exports = self.modules[name]
        if exports is None:
            raise KeyError(f"no Lua module {name!r} (control_plane/bootstrap.py LUA_MODULES)")
        return exports

    def run_request(self, method: str = "POST", path: str = AUDIO_PATH, headers: dict | list | None = None,
                    body: bytes | str | None = None, remote_address: str = "127.0.0.1:40000",
                    now_ms: int | None = None, metadata: dict[str, dict] | None = None) -> Outcome:
        """envoy_on_request for one request; `headers`: a dict or (name, value) pairs, beside the
        pseudo-headers; `body`: None for a request without one; `metadata`: dynamic metadata an
        earlier filter set."""
        pairs = [(":method", method), (":path", path), (":authority", "gateway"), (":scheme", "http")]
        pairs += list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if body is not None and not any(k.lower() == "content-length" for k, _ in pairs):
            pairs.append(("content-length", str(len(body))))
        record = self.stub.record(self._header_table(pairs), _bytes(body), remote_address,
                                  self.now_ms if now_ms is None else now_ms)
        for namespace, fields in (metadata or {}).items():
            record.metadata[namespace] = self.lua.table_from(fields)
        return self._outcome(self.stub.run(self.lua.globals().envoy_on_request, record, "request"))

    def call(self, function, *args, headers: dict | list | None = None) -> Outcome:
        """A Lua function of the filter (e.g. module("openai_errors").reply) called as function(h, *args)
        with the handle of a request without a body, as envoy_on_request would call it."""
        bind = self.lua.eval("function(f, ...) local n, args = select('#', ...), {...} "
                             "return function(h) return f(h, unpack(args, 1, n)) end end")
        pairs = [(":method", "POST"), (":path", AUDIO_PATH)] + (
            list(headers.items()) if isinstance(headers, dict) else list(headers or []))
        record = self.stub.record(self._header_table(pairs), None, "127.0.0.1:40000", self.now_ms)
        return self._outcome(self.stub.run(bind(function, *args), record, "request"))

    def run_response(self, status: int = 200, headers: dict | list | None = None,
                     metadata: dict[str, dict] | None = None, body: bytes | str | None = None) -> Outcome:
        """envoy_on_response with the request's dynamic metadata (an Outcome's .metadata) and the
        answer's body; .error says when the filter has none."""
        pairs = [(":status", str(status))] + (list(headers.items()) if isinstance(headers, dict) else list(headers or []))
        if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in pairs):
            pairs.append(("content-length", str(len(body))))
        record = self.stub.record(self._header_table(pairs), _bytes(body), "127.0.0.1:40000", self.now_ms)
        for namespace, fields in (metadata or {}).items():
            record.metadata[namespace] = self.lua.table_from(fields)
        return self._outcome(self.stub.run(self.lua.globals().envoy_on_response, record, "response"))

    def _header_table(self, pairs):
        return self.lua.table_from([self.lua.table_from([str(k), str(v)]) for k, v in pairs])

    def _outcome(self, record) -> Outcome:
        reply_headers = dict(record.reply_headers.items()) if record.reply_headers else {}
        return Outcome(
            error=record.error,
            status=int(reply_headers[":status"]) if record.responded else None,
            reply_headers=reply_headers,
            reply_body=_bytes(record.reply_body),
            headers=[(entry[1], entry[2]) for entry in record.headers.values()],
            body=_bytes(record.body),
            metadata={ns: _to_python(fields) for ns, fields in record.metadata.items()},
            route_cache_cleared=bool(record.route_cache_cleared),
            body_calls=int(record.body_calls),
            bytes_read=int(record.bytes_read),
            body_set=bool(record.body_set),
            logs=[(entry[1], entry[2]) for entry in record.logs.values()],
            violations=list(record.violations.values()),
            stream=record,
        )
