"""Seeded mutation fuzzing of the Lua filter's parsers, in-process (harness/lua_filter.py).

Two targets, each fed real inputs mutated in Lua (one Python call runs a batch of thousands):
audio_duration, audio_duration.lua's entry point, on the corpus's real files; and the whole
request path, envoy_on_request (multipart.lua's scanner, then the duration), on
real multipart forms. Mutations: bytes flipped or set, 16/32/64-bit fields set to 0, 1,
0x7fffffff, 0xffffffff and their kin (LE and BE, at the offsets of each format's fields),
EBML sizes, truncations, insertions (format tokens, delimiters, copies of the input's own
chunks, floods) and deletions. Each input must give no Lua error, no read outside the body or
the file part, no duration negative, NaN or above limits.max_audio_s, only the filter's 400/404
answers (as valid JSON) or a route, and take at most SLOWEST_CASE_S.

LUA_FUZZ_CASES inputs per target (DEFAULT_CASES without it: about 20 s for both on 2 cores;
`make fuzz` runs 1,000,000 each); LUA_FUZZ_SEED changes the seed (default 28). Every batch is
reproducible from its seed (the corpus's encoders add random stream serials, so inputs differ
between corpus builds); a failure names its batch seed and case, and its input is kept as a file.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from control_plane.config import parse_config
from harness.audio_corpus import make_corpus, missing_tools
from engines.common.audio import silent_wav
from harness.lua_filter import LuaFilter
from harness.processes import multipart
from tests.test_audio_seconds import HOSTILE, MAX_AUDIO_S, _mutations

pytestmark = pytest.mark.e2e  # the Lua runs in process, but its seeds are the corpus, made by encoders

MODEL, ALIAS = "whisper-large-v3-turbo", "whisper-1"
# Inputs per target in `make test`, about 20 s together on 2 cores (audio_duration ~100,000 a
# second, the whole request path ~12,000); LUA_FUZZ_CASES sets both (`make fuzz`: 1,000,000).
DEFAULT_CASES = {"audio_duration": 1_000_000, "envoy_on_request": 120_000}
CASES = int(os.environ["LUA_FUZZ_CASES"]) if os.environ.get("LUA_FUZZ_CASES") else None
SEED = int(os.environ.get("LUA_FUZZ_SEED", 28))
BATCH = 25_000
SLOWEST_CASE_S = 0.25  # an Envoy worker held longer than this by one upload is a bug (pcall stops no loop)

AUDIO_TOKENS = ["RIFF", "RF64", "WAVE", "fmt ", "data", "ds64", "LIST", "fLaC", "ID3", "Xing", "Info", "LAME", "VBRI",
                "OggS", "OpusHead", "\x01vorbis", "ftyp", "moov", "mvhd", "mdat", "\x1a\x45\xdf\xa3", "\x18\x53\x80\x67",
                "\x15\x49\xa9\x66", "\x2a\xd7\xb1", "\x44\x89", "\x1f\x43\xb6\x75", "\xe7", "\xa3", "\xff\xfb", "\xff\xf3",
                "TAG"]

FUZZ = r"""
local ffi, bit = require("ffi"), require("bit")
local random, floor, min, max, clock = math.random, math.floor, math.min, math.max, os.clock
local find, sub, char = string.find, string.sub, string.char

local F = {}
local buf, cap = nil, 0 -- the input being mutated
local tokens, seeds, marks, own, own_marks, stacked = {}, {}, {}, {}, {}, 0.3
local WINDOW = 4096 -- multipart.lua's: where its windows begin and end matters

-- Offsets (0-based) where a token starts in `s`: where the fields worth lying in are.
local function marks_of(s, list)
  local out = {}
  for _, token in ipairs(list) do
    local pos, count = 1, 0
    while count < 64 do
      local at = find(s, token, pos, true)
      if not at then break end
      out[#out + 1], pos, count = at - 1, at + 1, count + 1
    end
  end
  return out
end

-- seeds_, tokens_: arrays of strings; own_[i]: tokens of seed i alone (a form's delimiters), which
-- are inserted more often and whose CRLF is taken away; stacked_: the share of inputs mutated 2-4 times.
function F.setup(seeds_, tokens_, own_, stacked_)
  seeds, tokens, marks, own, own_marks, stacked = {}, {}, {}, {}, {}, stacked_
  local longest = 0
  for i, t in ipairs(tokens_) do tokens[i] = t end
  for i, s in ipairs(seeds_) do
    own[i] = {}
    for k, t in ipairs(own_ and own_[i] or {}) do own[i][k] = t end
    seeds[i], marks[i], own_marks[i] = s, marks_of(s, tokens), marks_of(s, own[i])
    for _, at in ipairs(own_marks[i]) do marks[i][#marks[i] + 1] = at end
    if #marks[i] == 0 then marks[i][1] = 0 end
    longest = max(longest, #s)
  end
  cap = longest + 32768
  buf = ffi.new("uint8_t[?]", cap)
  return #seeds
end

local function offset(n, m)
  local r = random()
  if r < 0.55 then
    local o = m[random(#m)] + (random() < 0.7 and random(0, 11) * 4 + random(0, 1) * 2 or random(-8, 64))
    return max(0, min(n - 1, o))
  elseif r < 0.75 then return random(0, min(n, 512) - 1)
  elseif r < 0.85 then return n - random(1, min(n, 2048))
  elseif r < 0.9 then -- about the edges of multipart.lua's windows
    return max(0, min(n - 1, (random() < 0.5 and WINDOW or n - WINDOW) + random(-80, 80)))
  end
  return random(0, n - 1)
end

local VALUES = {0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff, 0x80000000,
  0xfffffffe, 0xffffffff}
local VINTS = {"\1\255\255\255\255\255\255\255", "\255", "\128", "\8\0\0\0\0\0\0\0", "\1\0\0\0\0\0\0\0", "\64\0",
  "\0", "\1\0\0\0\0\0\0\9", "\16\255\255\255"}

local function put(n, o, value, width, big_endian) -- value: 32 bits; width 8: a high word of 0 or all ones
  if o + width > n then return end
  local high = (width == 8 and random() < 0.3) and 0xffffffff or 0
  for k = 0, width - 1 do
    buf[big_endian and (o + width - 1 - k) or (o + k)] = bit.band(bit.rshift(k < 4 and value or high, (k % 4) * 8), 255)
  end
end

local function insert(n, o, s)
  local len = #s
  if n + len > cap then return n end
  ffi.C.memmove(buf + o + len, buf + o, n - o)
  ffi.copy(buf + o, s, len)
  return n + len
end

local function delete(n, o, len)
  len = max(0, min(len, n - o))
  ffi.C.memmove(buf + o, buf + o + len, n - o - len)
  return n - len
end

local function mutate_once(n, si)
  local m, mine = marks[si], own[si]
  if n == 0 then return insert(n, 0, tokens[random(#tokens)]) end
  local how = random(100)
  if how <= 27 then -- bytes flipped or set
    for _ = 1, random(1, 8) do
      local o = offset(n, m)
      buf[o] = random() < 0.5 and random(0, 255) or bit.bxor(buf[o], bit.lshift(1, random(0, 7)))
    end
  elseif how <= 50 then -- a length field lies
    local o, width = offset(n, m), ({2, 4, 4, 4, 8})[random(5)]
    local value = VALUES[random(#VALUES)]
    if random() < 0.2 then -- off by a little from what is there
      value = bit.band(buf[o] + random(-16, 16), 255)
      width = 1
    end
    put(n, o, value, width, random() < 0.5)
  elseif how <= 54 then -- an EBML size
    local o, v = offset(n, m), VINTS[random(#VINTS)]
    if o + #v <= n then ffi.copy(buf + o, v, #v) end
  elseif how <= 62 then -- cut short
    return random() < 0.5 and random(0, min(n, 4096)) or random(0, n)
  elseif how <= 80 then -- something inserted
    local o, r = offset(n, m), random()
    if r < 0.25 and #mine > 0 then return insert(n, o, mine[random(#mine)]) end
    if r < 0.5 then return insert(n, o, tokens[random(#tokens)]) end
    if r < 0.75 then -- a chunk of its own, elsewhere (a part or a box twice)
      local from = m[random(#m)]
      local len = min(n - from, random(1, 512))
      if len <= 0 then return n end
      return insert(n, o, ffi.string(buf + from, len))
    end
    if r < 0.9 then
      local t = {}
      for k = 1, random(1, 16) do t[k] = char(random(0, 255)) end
      return insert(n, o, table.concat(t))
    end
    return insert(n, o, string.rep(char(random(0, 255)), random(1, 4096)))
  elseif how <= 88 and #own_marks[si] > 0 then -- a delimiter loses its CRLF, or the bytes around it
    local at = own_marks[si][random(#own_marks[si])]
    if random() < 0.6 then return delete(n, max(0, at - 2), 2) end
    return delete(n, max(0, at + random(-4, 4)), random(1, 8))
  else -- something deleted
    return delete(n, offset(n, m), random() < 0.8 and random(1, 16) or random(1, 2048))
  end
  return n
end

local function mutated(si)
  local s = seeds[si]
  local n = #s
  ffi.copy(buf, s, n)
  for _ = 1, random() < stacked and random(2, 4) or 1 do n = mutate_once(n, si) end
  return n
end

local function failure(list, limit, what)
  list.count = list.count + 1
  if #list < limit then list[#list + 1] = what end
end

-- audio_duration on `cases` mutated files. Reads are checked against the file's size here,
-- since audio_duration's pcall would swallow the error.
function F.audio(audio_duration, names, cases, seed, max_seconds)
  math.randomseed(seed)
  local size, bad = 0, nil
  local function read(offset_, n)
    if offset_ < 0 or n < 0 or offset_ + n > size or offset_ ~= floor(offset_) or n ~= floor(n) then
      bad = bad or ("read(" .. offset_ .. ", " .. n .. ") of a " .. size .. "-byte file part")
      error("outside the file part")
    end
    return ffi.string(buf + offset_, n)
  end
  local out = {failures = {count = 0}, estimated = 0, slowest = 0, slowest_case = 0, cases = cases}
  for case = 1, cases do
    local si = random(#seeds)
    size, bad = mutated(si), nil
    local r = random()
    local name = r < 0.6 and names[si] or (r < 0.8 and "clip.bin" or nil)
    local t0 = clock()
    local ok, seconds, estimated = pcall(audio_duration, read, size, name, max_seconds)
    local took = clock() - t0
    if took > out.slowest then out.slowest, out.slowest_case = took, case end
    local why = nil
    if not ok then why = "a Lua error: " .. tostring(seconds)
    elseif type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > max_seconds then
      why = "duration " .. tostring(seconds)
    elseif not (tonumber(string.format("%.3f", seconds)) <= max_seconds) then -- as metering.lua shows it
      why = string.format("duration %.17g shown as %.3f", seconds, seconds)
    elseif type(estimated) ~= "boolean" then why = "estimated is " .. tostring(estimated)
    elseif bad then why = bad
    end
    if estimated == true then out.estimated = out.estimated + 1 end
    if why then
      failure(out.failures, 5, {case = case, seed_index = si, why = why, name = name, input = ffi.string(buf, size)})
    end
  end
  return out
end

-- envoy_on_request through the stub on `cases` mutated forms.
function F.forms(stub, content_types, cases, seed, max_seconds, served)
  math.randomseed(seed)
  local out = {failures = {count = 0}, statuses = {}, routed = 0, slowest = 0, slowest_case = 0, cases = cases,
               replies = {}, reply_count = 0}
  for case = 1, cases do
    local si = random(#seeds)
    local n = mutated(si)
    local body = ffi.string(buf, n)
    local record = stub.record({{":method", "POST"}, {":path", "/v1/audio/transcriptions"},
      {"content-type", content_types[si]}, {"content-length", tostring(n)}}, body, "192.0.2.1:4000", 0)
    local t0 = clock()
    stub.run(envoy_on_request, record, "request")
    local took = clock() - t0
    if took > out.slowest then out.slowest, out.slowest_case = took, case end
    local why = nil
    if record.error then why = "a Lua error: " .. record.error
    elseif #record.violations > 0 then why = "misused Envoy's API: " .. table.concat(record.violations, "; ")
    elseif record.responded then
      local status = record.reply_headers[":status"]
      out.statuses[status] = (out.statuses[status] or 0) + 1
      local reply = record.reply_body or ""
      if status ~= "400" and status ~= "404" then why = "answered " .. status
      elseif not find(reply, '^{"error":{"message":"') or find(reply, "[%z\1-\31\127-\255]") then
        why = "a reply that is not plain JSON: " .. reply
      elseif out.reply_count < 2000 and not out.replies[reply] then -- for Python's json.loads
        out.replies[reply], out.reply_count = true, out.reply_count + 1
      end
    else
      local headers = record.handle_headers
      local model, shown = headers:get("x-whisper-model"), headers:get("x-whisper-audio-seconds")
      local seconds = tonumber(shown)
      local metadata = record.metadata.whisper_gateway or {}
      out.routed = out.routed + 1
      if not served[model or ""] then why = "routed to " .. tostring(model)
      elseif not record.route_cache_cleared then why = "routed without clearing the route cache"
      elseif not seconds or seconds ~= seconds or seconds < 0 or seconds > max_seconds then
        why = "audio-seconds " .. tostring(shown)
      elseif metadata.audio_seconds ~= shown or metadata.model ~= model then why = "metadata differs from headers"
      end
    end
    if why then
      failure(out.failures, 5, {case = case, seed_index = si, why = why, input = body})
    end
  end
  return out
end

return F
"""


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list:
    """The 1 s clip of every format (harness/audio_corpus.py), the seeds test_audio_seconds mutates."""
    assert not missing_tools(), f"install {missing_tools()} (make deps does)"
    return make_corpus(tmp_path_factory.mktemp("fuzz-corpus"), (1.0,))


@pytest.fixture(scope="module")
def lua() -> LuaFilter:
    raw = {"models": [{"name": MODEL, "aliases": [ALIAS]}, {"name": "whisper-small"}], "backends": [],
           "limits": {"max_upload_mb": 64.0, "max_audio_s": MAX_AUDIO_S}}
    return LuaFilter(parse_config(raw))


def fuzzer(lua: LuaFilter):
    load = lua.lua.eval("function(source) return assert(loadstring(source, '=tests/test_lua_fuzz.py'))() end")
    lua.lua.execute("require('ffi').cdef('void *memmove(void *dest, const void *src, size_t n);')")
    return load(FUZZ)


def lua_list(lua: LuaFilter, items: list):
    return lua.lua.table_from([item.decode("latin-1") if isinstance(item, bytes) else item for item in items])


def batches(total: int):
    """(batch seed, cases) pairs: every batch reproducible from its own seed."""
    for index, start in enumerate(range(0, total, BATCH)):
        yield SEED * 1_000_003 + index, min(BATCH, total - start)


def run_batches(run, name: str, keep: Path) -> list:
    """Runs CASES inputs in batches; a failure's input is kept in `keep`, named by batch seed and case."""
    started, results, failures, slowest = time.perf_counter(), [], [], (0.0, None)
    for batch_seed, cases in batches(CASES or DEFAULT_CASES[name]):
        result = run(batch_seed, cases)
        results.append(result)
        for failure in [result.failures[i] for i in range(1, len(result.failures) + 1)][:3]:
            path = keep / f"{name}-{batch_seed}-{failure.case}.bin"
            path.write_bytes(failure.input.encode("latin-1"))
            failures.append(f"batch seed {batch_seed}, case {failure.case}: {failure.why[:400]!r} (input: {path})")
        if result.slowest > slowest[0]:
            slowest = (result.slowest, (batch_seed, result.slowest_case))
    took = time.perf_counter() - started
    total = sum(r.cases for r in results)
    print(f"\n{name}: {total:,} mutated inputs in {took:.1f} s, {total / took:,.0f} a second (seed {SEED}); "
          f"slowest {slowest[0] * 1000:.2f} ms (batch seed, case {slowest[1]})")
    count = sum(r.failures["count"] for r in results)
    assert not failures, f"{count} of {total} inputs failed, among them:\n" + "\n".join(failures)
    assert slowest[0] <= SLOWEST_CASE_S, slowest
    return results


def test_audio_duration_survives_mutated_real_files(lua, clips, tmp_path):
    fuzz = fuzzer(lua)
    data = [c.path.read_bytes() for c in clips]
    fuzz.setup(lua_list(lua, data), lua_list(lua, AUDIO_TOKENS), None, 0.3)
    names = lua_list(lua, [c.path.name for c in clips])
    audio_duration = lua.module("audio_duration").audio_duration
    results = run_batches(lambda batch_seed, cases: fuzz.audio(audio_duration, names, cases, batch_seed, MAX_AUDIO_S),
                          "audio_duration", tmp_path)
    estimated = sum(r.estimated for r in results) / sum(r.cases for r in results)
    assert 0.05 < estimated < 0.95, estimated  # mutations reach both the exact readers and the estimate


def seed_forms(clips) -> list[tuple[bytes, str]]:
    """Real forms: SDK-like and browser-like boundaries, model before or after the file, alias or name,
    other fields, a quoted boundary with an unquoted field name."""
    forms = []
    for i, clip in enumerate(c for c in clips if c.name.split("-", 1)[1] in
                             ("wav", "flac", "mp3-vbr", "opus", "m4a-moov-at-end", "webm")):
        audio, name = clip.path.read_bytes(), clip.path.name
        boundary = ["wgboundary7MA4YWxk", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "d41d8cd98f00b204e9800998ecf8427e"][i % 3]
        forms.append((multipart([("model", ALIAS, None), ("file", audio, name)], boundary), boundary))
        forms.append((multipart([("file", audio, name), ("model", MODEL, None), ("language", "en", None),
                                 ("response_format", "verbose_json", None)], boundary), boundary))
    # The fields at the ends of a large body, found by multipart.lua's windows or by its whole scan.
    short = silent_wav(0.08)  # the file within the last window
    forms.append((multipart([("prompt", "Meeting notes. " * 700, None), ("model", ALIAS, None), ("file", short, "a.wav")],
                            "wgboundary7MA4YWxk"), "wgboundary7MA4YWxk"))
    forms.append((multipart([("file", clips[0].path.read_bytes(), clips[0].path.name), ("prompt", "x" * 20_000, None),
                             ("model", MODEL, None), ("temperature", "0" * 9000, None)], "wgboundary7MA4YWxk"),
                  "wgboundary7MA4YWxk"))
    boundary = "quoted boundary (needs quotes)"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-small\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
            f"Content-Type: audio/mpeg\r\n\r\n")
    mp3 = next(c for c in clips if c.name == "1s-mp3-vbr").path.read_bytes()
    body = head.encode() + mp3 + f"\r\n--{boundary}--\r\n".encode()
    forms.append((body, f'"{boundary}"'))
    return forms


def test_the_request_path_survives_mutated_real_forms(lua, clips, tmp_path):
    fuzz = fuzzer(lua)
    forms = seed_forms(clips)
    own = []
    for _, boundary in forms:  # each form's own delimiters
        b = boundary.strip('"')
        own.append(lua_list(lua, [f"--{b}", f"\r\n--{b}", f"\r\n--{b}--", f"\r\n--{b}\r\n", f"--{b}--"]))
    form_tokens = ["\r\n\r\n", "\r\n", "\n", '"', ";", 'name="model"', 'name="file"; filename="a/b.wav"', "name=model",
                   "filename=", "Content-Disposition: form-data; ", "\x00", "\x01", "\xc3\xa9", "h" * 9000, ALIAS, MODEL,
                   "m" * 300, "--"]
    fuzz.setup(lua_list(lua, [body for body, _ in forms]), lua_list(lua, form_tokens + AUDIO_TOKENS),
               lua.lua.table_from(own), 0.5)
    content_types = lua_list(lua, [f"multipart/form-data; boundary={b}" for _, b in forms])
    served = lua.lua.table_from({MODEL: True, "whisper-small": True})
    results = run_batches(lambda batch_seed, cases: fuzz.forms(lua.stub, content_types, cases, batch_seed, MAX_AUDIO_S,
                                                               served), "envoy_on_request", tmp_path)
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    routed = sum(r.routed for r in results)
    print(f"routed {routed:,}, answered {statuses}")
    total = sum(r.cases for r in results)
    assert routed > total // 10 and statuses.get("400", 0) > total // 10  # both ends of the path are reached
    for r in results[:3]:
        for reply in r.replies.keys():
            assert json.loads(reply)["error"]["message"], reply


def test_the_end_to_end_suites_mutations_and_hostile_headers_through_the_stub(lua, clips):
    """The 2000 mutated uploads (same seeds, same generator) and the hostile headers that
    tests/test_audio_seconds.py sends through a real Envoy, here in a second."""
    uploads = _mutations([c.path.read_bytes() for c in clips], 2000, random.Random(15))
    uploads += [data for _, data in HOSTILE]
    for data in uploads:
        outcome = lua.run_request(headers={"content-type": "multipart/form-data; boundary=wgboundary7MA4YWxk"},
                                  body=multipart([("model", ALIAS, None), ("file", data, "clip.bin")]))
        assert outcome.routed and not outcome.violations, (outcome.error, outcome.violations, outcome.reply_body)
        seconds = float(outcome.header("x-whisper-audio-seconds"))
        assert 0 <= seconds <= MAX_AUDIO_S, seconds
