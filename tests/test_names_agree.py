"""The Lua filter and the control plane say the same names and build the same error body.

The wire names the filter shares with the control plane (headers, dynamic metadata keys, limits,
windows) are control_plane/names.py's, written ahead of the filter as `local NAMES = {...}`
(builders/lua_source.py); a copy typed into envoy/*.lua, or a NAMES field no one writes, fails
here. The OpenAI error body the filter builds at request time (`reply` in envoy/openai_errors.lua)
parses to exactly what control_plane/openai_errors.py gives the rest. In process (LuaJIT via lupa).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lupa import luajit21 as lupa

from control_plane import names
from control_plane.bootstrap import ENVOY_DIR, LUA_FILTER_PATHS
from control_plane.builders.lua_source import filter_source
from control_plane.config import parse_config
from control_plane.names import LUA_NAMES
from control_plane.openai_errors import openai_error
from control_plane.tenants.keys import Access
from harness.lua_filter import LuaFilter

# Literals that equal an injected name's value but mean something else.
OTHER_MEANINGS = {
    "model": "the form field `model`, and the `param` of errors about it (OpenAI's API), not MODEL_KEY",
    "requests": "the suffix of OpenAI's x-ratelimit-*-requests headers, not REQUESTS_LIMIT",
}

_TOKEN = re.compile(r"""--\[(=*)\[.*?\]\1\]           # a long comment
                      | --[^\n]*                      # a comment
                      | \[(=*)\[(?P<long>.*?)\]\2\]   # a long string
                      | "(?P<dq>(?:[^"\\\n]|\\.)*)"
                      | '(?P<sq>(?:[^'\\\n]|\\.)*)'
                      | (?P<number>\b0[xX][0-9a-fA-F]+\b|\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b)""", re.S | re.X)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "\\": "\\", '"': '"',
            "'": "'", "\n": "\n"}


def _unescaped(text: str) -> str:
    def one(match: re.Match) -> str:
        escape = match.group(1)
        if escape.isdigit():
            return chr(int(escape))
        if escape[0] == "x":
            return chr(int(escape[1:], 16))
        return _ESCAPES.get(escape, escape)
    return re.sub(r"\\(\d{1,3}|x[0-9a-fA-F]{2}|.)", one, text, flags=re.S)


def lua_literals(path: Path) -> list[tuple[int, str | int | float]]:
    """The string and number literals of a Lua file (comments skipped), with their lines."""
    text, found = path.read_text(), []
    for match in _TOKEN.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group("long") is not None:
            found.append((line, match.group("long")))
        elif match.group("dq") is not None or match.group("sq") is not None:
            found.append((line, _unescaped(match.group("dq") if match.group("dq") is not None else match.group("sq"))))
        elif match.group("number"):
            number = match.group("number")
            found.append((line, int(number, 0) if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", number) else float(number)))
    return found


def test_the_literal_reader_reads_lua(tmp_path):
    probe = tmp_path / "probe.lua"
    probe.write_text('local a = "x-whisper-model" -- "commented"\n--[[ "long\ncomment" ]]\n'
                     'local b = \'q\\"\' .. [[long]] .. 60 .. "\\65\\x42" .. h0\n')
    assert lua_literals(probe) == [(1, "x-whisper-model"), (4, 'q"'), (4, "long"), (4, 60), (4, "AB")]


def test_no_lua_file_types_a_shared_name():
    """Each value the filter shares with the control plane comes from NAMES, never as a literal."""
    shared = {value: name for name, value in LUA_NAMES.items()}
    retyped, other_meanings_seen = [], set()
    for path in sorted(ENVOY_DIR.glob("*.lua")):
        for line, value in lua_literals(path):
            if isinstance(value, str) and value.startswith("x-whisper-"):
                retyped.append(f"{path.name}:{line}: {value!r} (a gateway header: add it to names.LUA_NAMES)")
            elif value in shared and not isinstance(value, bool):
                if value in OTHER_MEANINGS:
                    other_meanings_seen.add(value)
                else:
                    retyped.append(f"{path.name}:{line}: {value!r} is names.{shared[value]}: use NAMES.{shared[value]}")
    assert not retyped, "\n".join(retyped)
    assert other_meanings_seen == set(OTHER_MEANINGS), "an exemption no longer needed"


def test_the_lua_reads_exactly_the_names_it_is_given():
    """Every NAMES.<field> the Lua reads is written (a typo would read nil), and every one written is read."""
    read = {name for path in LUA_FILTER_PATHS for name in re.findall(r"\bNAMES\.(\w+)", path.read_text())}
    assert read == set(LUA_NAMES), (sorted(read - set(LUA_NAMES)), sorted(set(LUA_NAMES) - read))


def test_the_generated_source_defines_every_name_with_its_value():
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    given = runtime.execute(filter_source("return NAMES", {}, Access()))
    assert dict(given.items()) == LUA_NAMES
    assert all(getattr(names, name) == value for name, value in LUA_NAMES.items())


MESSAGES = [
    "plain",
    'a "quoted" name',
    "back\\slash \\u0041 and \\\"",
    "controls: \x00 \x01 \t \n \r \x1f \x7f end",
    "non-ASCII: caf\u00e9 \u2603 \U0001F600",
    "everything: \"\\\x08\x0c/\u00ff",
    "",
]


def _as_lua_sends_it(message: str) -> str:
    """Lua's json_string turns every byte of 128 or more into '?' (client bytes need not be UTF-8)."""
    return "".join(c if ord(c) < 128 else "?" * len(c.encode()) for c in message)


@pytest.fixture(scope="module")
def lua() -> LuaFilter:
    return LuaFilter(parse_config({"models": [{"name": "big"}], "backends": []}))


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("status,error_type,param,code", [
    (400, "BadRequestError", "model", None),
    (401, "AuthenticationError", None, "invalid_api_key"),
    (429, "audio_seconds", "file", "rate_limit_exceeded"),
    (508, 'Loop"Detected\\', None, None),
])
def test_the_lua_reply_is_openai_error(lua, message, status, error_type, param, code):
    outcome = lua.call(lua.module("openai_errors").reply, status, message.encode(), error_type, param, code)
    assert outcome.error is None, outcome.error
    assert outcome.status == status and outcome.reply_headers["content-type"] == "application/json"
    assert json.loads(outcome.reply_body) == openai_error(_as_lua_sends_it(message), error_type, param,
                                                          status if code is None else code)
    assert outcome.metadata[names.METADATA_NAMESPACE][names.LUA_REPLY_KEY] == str(status if code is None else code)
