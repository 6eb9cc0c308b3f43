"""The Lua filter's source as Envoy gets it: the values it needs, as Lua constants, ahead of the code.

NAMES are the wire names it shares with the rest (control_plane/names.py LUA_NAMES), so envoy/*.lua
types none of them; CONTEXT and KEY_GRANTS are the config's, the fleet's and the keys' values.

The routes carry this source inline (LuaPerRoute.source_code), compiled once per update,
rather than the values in a `filter_context`: Envoy copies a route's whole filter_context into
every request that reads it, and with a key table of 1000 keys there each request cost five
times as much (docs/benchmarks.md). Constants cost nothing per request.
"""

from __future__ import annotations

from control_plane.names import LUA_NAMES
from control_plane.tenants.keys import Access

GRANTS_PER_FUNCTION = 500  # LuaJIT caps the constants of one function; each grant is its own few


def _literal(value) -> str:
    """A Lua literal of a config value: names and digests are checked printable ASCII."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if not value.isascii() or not value.isprintable() or '"' in value or "\\" in value:
            raise ValueError(f"cannot put {value!r} in the Lua filter's source")
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_literal(k)}] = {_literal(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(map(_literal, value)) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def filter_source(lua_source: str, context: dict, access: Access) -> str:
    """NAMES, CONTEXT (the routing values) and KEY_GRANTS (digest -> {id, models}), then the filter."""
    # No `;` after KEY_GRANTS: the next line may start with one, and `;;` (an empty statement)
    # parses only in LuaJIT built with Lua 5.2 compatibility (Envoy's is, lupa's is not).
    lines = [f"local NAMES = {_literal(LUA_NAMES)};", f"local CONTEXT = {_literal(context)};", "local KEY_GRANTS = {}"]
    items = sorted(access.grants.items())
    for start in range(0, len(items), GRANTS_PER_FUNCTION):
        lines.append(";(function(t)  -- `;`: a line starting with ( would call the line before")
        for digest, grant in items[start:start + GRANTS_PER_FUNCTION]:
            lines.append(f"t[{_literal(digest)}] = {_literal(grant.to_context())}")
        lines.append("end)(KEY_GRANTS)")
    return "\n".join(lines) + "\n" + lua_source
