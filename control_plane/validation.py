"""Checked values for the config file and the admin API: pydantic does the checking, this says why.

A field's bounds and pattern live in its annotation (`within`, `matching`); `check` validates a
value against such a type or a whole dataclass and phrases the first failure the way an
operator wrote the key: `listen.port: 0 is out of range 1..65535`, `models[1].name: required`.
The same annotations put the bounds and pattern in the type's JSON schema
(`TypeAdapter(kind).json_schema()`), which the admin API's OpenAPI document is made of
(control_plane/operator/openapi.py). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError, core_schema


class ConfigError(ValueError):
    """A bad value, phrased as `key: problem`."""


def shown(value: Any) -> str:
    """A value as an error message quotes it: numbers plain, strings quoted, long ones cut."""
    if isinstance(value, int) and value.bit_length() > 128:  # str() refuses over 4,300 digits
        return f"a {int(value.bit_length() * 0.30103) + 1}-digit number"
    text = str(value) if isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def fail(message: str, kind: str = "gateway"):
    """Inside a validator: the field is wrong, and `message` says how."""
    raise PydanticCustomError(kind, message)


@dataclass(frozen=True, eq=False)
class Checked:
    """A check run after pydantic's own (as an AfterValidator is), and the JSON schema keywords
    that say the same (`minimum`, `pattern`): a type's schema shows what its check refuses."""

    check: Callable[[Any], Any]
    schema: dict

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return handler(schema) | self.schema


def within(low: float, high: float) -> Checked:
    """A number's bounds: outside them is `<value as given> is out of range low..high`."""
    def check_range(value):
        if not low <= value <= high:
            fail(f"is out of range {low}..{high}", "out_of_range")
        return value
    return Checked(check_range, {"minimum": low, "maximum": high})


def matching(pattern: re.Pattern, problem: str) -> Checked:
    """A string's pattern (the whole string must match); `problem` says what is wrong with {!r}."""
    def check_pattern(value: str) -> str:
        if not pattern.fullmatch(value):
            fail(problem.format(value))
        return value
    return Checked(check_pattern, {"pattern": f"^(?:{pattern.pattern})$" if "|" in pattern.pattern
                                   else f"^{pattern.pattern}$"})


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "tuple_type": "a list", "list_type": "a list", "dataclass_type": "a mapping"}


def _dataclasses_in(hint) -> list[type]:
    if hasattr(hint, "__dataclass_fields__"):
        return [hint]
    return [found for arg in get_args(hint) for found in _dataclasses_in(arg)]


def _tags(section: type) -> tuple:
    kind = get_type_hints(section).get("kind")
    return get_args(kind) if get_origin(kind) is Literal else ()


def _walk(root: type, loc: tuple) -> tuple[list, list[type]]:
    """The key path as the file spells it (a tagged union's tag is no key) and the sections it ends in."""
    spelled, here = [], [root]
    for part in loc:
        if isinstance(part, str) and not any(part in s.__dataclass_fields__ for s in here):
            tagged = [s for s in here if part in _tags(s)]
            if tagged:
                here = tagged
                continue
        spelled.append(part)
        if isinstance(part, str):
            here = [d for s in here if part in s.__dataclass_fields__ for d in _dataclasses_in(get_type_hints(s)[part])]
    return spelled, here


def _problem(error: dict, root: type) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "unexpected_keyword_argument":
        sections = _walk(root, error["loc"][:-1])[1]
        return f"unknown key (allowed: {', '.join(sorted(sections[0].__dataclass_fields__))})" if sections else "unknown key"
    if kind in _EXPECTED:
        got = type(value).__name__ if kind in ("tuple_type", "list_type", "dataclass_type") else shown(value)
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in ("literal_error", "union_tag_invalid", "union_tag_not_found"):
        expected = (ctx.get("expected") or ctx.get("expected_tags") or "").replace(" or ", ", ").replace("'", "")
        got = value.get("kind") if kind.startswith("union_tag") and isinstance(value, dict) else value
        return f"expected one of {expected}, got {shown(got)}" if expected else "required"
    if kind == "out_of_range":
        return f"{shown(value)} {error['msg']}"
    if kind == "string_too_short":
        return f"expected a non-empty string, got {shown(value)}"
    return error["msg"]


def _message(error: dict, root: type, prefix: str) -> str:
    loc = tuple(error["loc"]) + (("kind",) if error["type"].startswith("union_tag") else ())
    spelled = _walk(root, loc)[0] if hasattr(root, "__dataclass_fields__") else list(loc)
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in spelled)
    return f"{key.lstrip('.') or 'config'}: {_problem(error, root)}"


def _config_error(error: ValidationError, root: type, prefix: str) -> ConfigError:
    return ConfigError(_message(error.errors()[0], root, prefix))


def problems(kind, value: Any) -> list[str]:
    """Every key of `value` that is wrong for `kind`, each said as check() would say it (a checker
    shows them all at once; a process stops at the first)."""
    try:
        _adapter(kind).validate_python(value)
    except ValidationError as error:
        return [_message(each, kind, "") for each in error.errors()]
    return []


@lru_cache(maxsize=None)
def _adapter(kind) -> TypeAdapter:
    return TypeAdapter(kind)


def check(kind, value: Any, key: str = ""):
    """`value` as `kind` (a field type or a whole dataclass); ConfigError names the key under `key`."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as error:
        raise _config_error(error, kind, key) from None
