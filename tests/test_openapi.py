"""The admin API's OpenAPI document: valid OpenAPI 3.0, and its bounds are the checks' own.

The weight, drain timeout, rotation grace and name pattern the document shows come from the
pydantic types the admin API checks with (control_plane/operator/openapi.py), so each bound
shown is where check() starts refusing. In process.
"""

from __future__ import annotations

import re

import pytest

from control_plane.config import ConfigError, DrainTimeout, ModelName, RotationGrace, Weight, check
from control_plane.operator.openapi import OPENAPI
from control_plane.tenants.keys import NAME_PATTERN, Name
from control_plane.xds.snapshot import MAX_WEIGHT, MIN_WEIGHT

SCHEMAS = OPENAPI["components"]["schemas"]
# OpenAPI 3.0.3's Schema Object (https://spec.openapis.org/oas/v3.0.3#schema-object), and its types.
SCHEMA_KEYWORDS = {
    "title", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength",
    "pattern", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties", "required", "enum", "type",
    "allOf", "oneOf", "anyOf", "not", "items", "properties", "additionalProperties", "description", "format",
    "default", "nullable", "discriminator", "readOnly", "writeOnly", "xml", "externalDocs", "example", "deprecated",
    "$ref"}
TYPES = {"string", "number", "integer", "boolean", "array", "object"}


def _refuses(kind, value) -> bool:
    try:
        check(kind, value)
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("kind,schema", [
    (Weight, SCHEMAS["NewBackend"]["properties"]["weight"]),
    (Weight, SCHEMAS["Backend"]["properties"]["weight"]),
    (DrainTimeout, SCHEMAS["Drain"]["properties"]["timeout_s"]),
    (RotationGrace, SCHEMAS["Rotate"]["properties"]["grace_s"]),
])
def test_each_bound_shown_is_where_the_check_refuses(kind, schema):
    low, high = schema["minimum"], schema["maximum"]
    step = 1 if schema["type"] == "integer" else 0.5
    value = float if schema["type"] == "number" else int
    assert not _refuses(kind, value(low)) and not _refuses(kind, value(high))
    assert _refuses(kind, value(low - step)) and _refuses(kind, value(high + step))


def test_the_weight_is_envoys():
    assert SCHEMAS["NewBackend"]["properties"]["weight"] == {"type": "integer", "minimum": MIN_WEIGHT,
                                                             "maximum": MAX_WEIGHT}


@pytest.mark.parametrize("kind,pattern,schema", [
    (Name, NAME_PATTERN, SCHEMAS["KeyFields"]["properties"]["name"]),
    (Name, NAME_PATTERN, SCHEMAS["NewToken"]["properties"]["name"]),
    (ModelName, None, SCHEMAS["NewBackend"]["properties"]["models"]["items"]),
])
def test_each_pattern_shown_is_the_checks(kind, pattern, schema):
    shown = re.compile(schema["pattern"])
    for name in ("a", "key-1", "team.a_b", "A" * 64, "A" * 65, "-x", ".x", "", "a b", "a/b", "a:b", "m@1+2",
                 "x" * 128, "x" * 129, "caf\u00e9"):
        assert bool(shown.search(name)) == (not _refuses(kind, name)), name
        if pattern is not None:
            assert bool(pattern.fullmatch(name)) == (not _refuses(kind, name)), name


def _schemas_in(node, where="$"):
    """Every Schema Object in the document, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "schema":
                yield from _schema_tree(value, here)
            elif key == "schemas":
                for name, schema in value.items():
                    yield from _schema_tree(schema, f"{here}.{name}")
            else:
                yield from _schemas_in(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schemas_in(value, f"{where}[{i}]")


def _schema_tree(schema, where):
    yield where, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _schema_tree(prop, f"{where}.properties.{name}")
    if "items" in schema:
        yield from _schema_tree(schema["items"], f"{where}.items")


def test_the_document_is_openapi_3_0():
    assert re.fullmatch(r"3\.0\.\d+", OPENAPI["openapi"])
    assert OPENAPI["info"]["title"] and OPENAPI["info"]["version"]
    schemas = list(_schemas_in(OPENAPI))
    assert len(schemas) > 50
    for where, schema in schemas:
        assert isinstance(schema, dict), where
        unknown = {k for k in schema if not k.startswith("x-")} - SCHEMA_KEYWORDS
        assert not unknown, (where, unknown)
        if "type" in schema:
            assert schema["type"] in TYPES, (where, schema["type"])
        if "$ref" in schema:
            assert set(schema) == {"$ref"}, where
            assert schema["$ref"].removeprefix("#/components/schemas/") in SCHEMAS, where
        if "pattern" in schema:
            re.compile(schema["pattern"])
        for name in schema.get("required", []):
            assert name in schema.get("properties", {}), (where, name)
    for path, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            if method != "parameters":
                assert operation["responses"], (path, method)
