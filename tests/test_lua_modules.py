"""The Lua filter's modules (envoy/<name>.lua, joined in control_plane/bootstrap.py LUA_MODULES'
order by read_lua_filter): each is its own function returning a table of its exports; a module
reads another only through that table, and only one joined before it; a module exports only what
another reads; and no module reads or writes a global beyond Lua's standard library and Envoy's
entry points. The globals are read from the compiled chunk's bytecode (LuaJIT's jit.util), so
every line counts, run or not. In process (LuaJIT via lupa).
"""

from __future__ import annotations

import re

import pytest
from lupa import luajit21 as lupa

from control_plane.bootstrap import LUA_FILTER_PATHS, LUA_MODULES, read_lua_filter
from control_plane.builders.lua_source import filter_source
from control_plane.config import parse_config
from control_plane.tenants.keys import Access
from harness.lua_filter import LuaFilter

ENTRY_POINTS = {"envoy_on_request", "envoy_on_response"}  # the globals Envoy looks up
# Exports no module reads, and who does.
READ_BY_TESTS = {("api_keys", "address_key"): "tests/test_bad_keys.py runs it in a bare Envoy"}
MAX_ENTRY_LINES = 25  # envoy_on_request is a composition of named steps

# Lua comments and strings, which may name a module without reading it (`envoy/api_keys.lua`).
_NOT_CODE = re.compile(r"""--\[(=*)\[.*?\]\1\]       # a long comment
                         | --[^\n]*                  # a comment
                         | \[(=*)\[.*?\]\2\]         # a long string
                         | "(?:[^"\\\n]|\\.)*"
                         | '(?:[^'\\\n]|\\.)*'""", re.S | re.X)
_MODULE_READ = re.compile(r"(?<![\w.:])(" + "|".join(LUA_MODULES) + r")\s*\.\s*([A-Za-z_]\w*)")


def module_reads(path) -> set[tuple[str, str]]:
    """(module, name) for each `module.name` in the file's code."""
    code = _NOT_CODE.sub(" ", path.read_text())
    return set(_MODULE_READ.findall(code))


@pytest.fixture(scope="module")
def lua() -> LuaFilter:
    return LuaFilter(parse_config({"models": [{"name": "big"}], "backends": []}))


def exports(lua: LuaFilter, name: str) -> set[str]:
    return set(lua.module(name).keys())


def test_each_module_returns_a_table_of_its_functions(lua):
    for name in LUA_MODULES:
        table = lua.module(name)
        assert lupa.lua_type(table) == "table", name
        assert all(lupa.lua_type(value) == "function" for value in table.values()), name
    assert exports(lua, "main") == set()  # its exports are the entry points, globals


def test_modules_read_each_other_only_through_exports_and_export_only_what_is_read(lua):
    read: dict[str, set[str]] = {name: set() for name in LUA_MODULES}
    wrong = []
    for position, (name, path) in enumerate(zip(LUA_MODULES, LUA_FILTER_PATHS)):
        for module, field in sorted(module_reads(path)):
            if LUA_MODULES.index(module) >= position:
                wrong.append(f"{path.name} reads {module}.{field}, but {module} is not joined before it")
            elif field not in exports(lua, module):
                wrong.append(f"{path.name} reads {module}.{field}, which {module}.lua does not export")
            read[module].add(field)
    assert not wrong, "\n".join(wrong)
    for module, field in READ_BY_TESTS:
        read[module].add(field)
    unread = {name: sorted(exports(lua, name) - read[name]) for name in LUA_MODULES if exports(lua, name) - read[name]}
    assert not unread, f"exported but read by no module: {unread}"


GLOBALS = r"""
local util = require("jit.util")
local band, rshift = bit.band, bit.rshift

-- The opcode that reads or writes a global, from a probe's bytecode (instruction 0 is the header).
local function opcode(probe, pc)
  local ins = util.funcbc(probe, pc)
  assert(util.funck(probe, -rshift(ins, 16) - 1) == "probe_global", "not a global's opcode")
  return band(ins, 0xff)
end
local GGET = opcode(function() return probe_global end, 1)
local GSET = opcode(function() probe_global = nil end, 2)

-- The globals the compiled chunk `source` reads and writes, in every function it holds.
return function(source)
  local reads, writes = {}, {}
  local function walk(f)
    for pc = 0, math.huge do
      local ins = util.funcbc(f, pc)
      if ins == nil then break end
      local op = band(ins, 0xff)
      if op == GGET or op == GSET then
        local name = util.funck(f, -rshift(ins, 16) - 1)
        if op == GGET then reads[name] = true else writes[name] = true end
      end
    end
    for k = -1, -math.huge, -1 do
      local constant = util.funck(f, k)
      if constant == nil then break end
      if type(constant) == "proto" then walk(constant) end
    end
  end
  walk(assert(loadstring(source)))
  return reads, writes
end
"""


def test_no_module_reads_or_writes_a_global_beyond_the_standard_library_and_the_entry_points():
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    standard = set(runtime.globals().keys()) - {"python"}  # a fresh state's: luaL_openlibs', as Envoy's
    globals_of = runtime.execute(GLOBALS)
    reads, writes = globals_of(filter_source(read_lua_filter(), {}, Access()))
    reads, writes = set(reads.keys()), set(writes.keys())
    assert writes == ENTRY_POINTS
    assert reads <= standard | ENTRY_POINTS, sorted(reads - standard - ENTRY_POINTS)
    assert "collectgarbage" in reads and "string" in reads  # the reader sees what the modules use


def test_envoy_on_request_is_a_short_composition(lua):
    info = lua.lua.execute("return require('jit.util').funcinfo(...)", lua.lua.globals().envoy_on_request)
    assert info.lastlinedefined - info.linedefined + 1 <= MAX_ENTRY_LINES
