"""The admin API described for machines (served at /openapi.json).

The bounds and patterns of the fields the admin API checks with the config's own types (a
weight, a drain's timeout, a rotation's grace, a model's, a key's or a token's name) are those
types' JSON schemas, so a bound changed there changes this document too.
"""

from __future__ import annotations

from pydantic import TypeAdapter

from control_plane.config import DrainTimeout, ModelName, RotationGrace, Weight
from control_plane.tenants.keys import Name

# What OpenAPI 3.0 shares with the JSON Schema pydantic writes (3.0 has no `null` type, `const`...).
_OPENAPI_30 = {"type", "minimum", "maximum", "pattern", "minLength", "maxLength", "enum"}


def _schema(kind, **more) -> dict:
    """`kind`'s JSON schema (the bounds and pattern its check enforces), with `more` (a description)."""
    schema = TypeAdapter(kind).json_schema()
    if not set(schema) <= _OPENAPI_30:
        raise TypeError(f"{kind} has a JSON schema OpenAPI 3.0 does not read: {schema}")
    return schema | more


_WEIGHT = _schema(Weight)
_NAME = _schema(Name)
_ERROR = {"$ref": "#/components/schemas/Error"}
_BACKEND = {"$ref": "#/components/schemas/Backend"}
_KEY = {"$ref": "#/components/schemas/Key"}
_TOKEN = {"$ref": "#/components/schemas/Token"}


def _answers(ok_status: str, ok_schema: dict, *errors: str) -> dict:
    responses = {ok_status: {"description": "OK", "content": {"application/json": {"schema": ok_schema}}}}
    for status in ("401", "403", "429", *errors):
        responses[status] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    return responses


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "whisper-gateway admin API", "version": "1", "description": (
        "Bearer tokens: the one the control plane starts with (an admin called bootstrap) or named tokens "
        "(/tokens) with a role: viewer (reads), operator (+ backends), admin (+ keys, tokens, audit). Each "
        "operation's x-required-role is the least role it needs; less gets 403 (permission_error). An address "
        "with 10 failed authentications within 60 s gets 429 with Retry-After until the oldest leaves the window.")},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": "string", "nullable": True}, "code": {"type": "integer"}}}}},
            "Backend": {"type": "object", "properties": {
                "id": {"type": "string"}, "url": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "weight": _WEIGHT,
                "source": {"type": "string", "description": "config, api, or dns:<name>"},
                "state": {"type": "string", "enum": ["active", "draining", "drained"]},
                "drain_deadline": {"type": "number", "nullable": True},
                "endpoints": {"type": "array", "items": {"type": "object"}}}},
            "NewBackend": {"type": "object", "required": ["url"], "additionalProperties": False, "properties": {
                "url": {"type": "string", "description": (
                    "http://host:port, no path or user info; host is a dotted IPv4 address, a bracketed IPv6 "
                    "address without a zone id, or a host name that resolves; link-local, unspecified, "
                    "multicast addresses and the gateway's own ports are refused")},
                "models": {"type": "array", "items": _schema(ModelName), "minItems": 1, "maxItems": 32,
                           "description": "default: read from the engine's /v1/models"},
                "weight": _WEIGHT}},
            "Drain": {"type": "object", "additionalProperties": False, "properties": {
                "timeout_s": _schema(DrainTimeout)}},
            "Key": {"type": "object", "properties": {
                "id": {"type": "string"}, "name": {"type": "string"},
                "state": {"type": "string", "enum": ["active", "revoked"]},
                "class": {"type": "string", "enum": ["interactive", "batch"]},
                "plan": {"type": "string", "nullable": True},
                "models": {"type": "array", "items": {"type": "string"}, "nullable": True,
                           "description": "the models it may use; null: all"},
                "created_at": {"type": "number"}, "revoked_at": {"type": "number", "nullable": True},
                "secrets": {"type": "array", "description": "valid secrets: a digest prefix and when each ends",
                            "items": {"type": "object"}},
                "usage": {"type": "object", "description": "per model: requests and audio-seconds metered"},
                "requests_in_flight": {"type": "integer", "description": "its requests in flight now (as logged to "
                                       "this control plane): what its plan's requests_in_flight limits"},
                "budget": {"type": "object", "description": "its budget across the Envoys as last published: "
                           "`charge` per limit (what each Envoy charges its requests, times their cost; absent: the "
                           "Envoys' count) and `refused` with `refused_until` (epoch s) when its day is spent"},
                "secret": {"type": "string", "description": "create and rotate only: the new secret, shown once"}}},
            "KeyFields": {"type": "object", "additionalProperties": False, "properties": {
                "name": _NAME,
                "models": {"type": "array", "items": {"type": "string"}, "nullable": True},
                "class": {"type": "string", "enum": ["interactive", "batch"]},
                "plan": {"type": "string", "description": "its limits: a plan under auth.plans (default: "
                                                          "auth.default_plan)"}}},
            "Token": {"type": "object", "properties": {
                "id": {"type": "string"}, "name": {"type": "string"},
                "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                "state": {"type": "string", "enum": ["active", "revoked"]},
                "created_at": {"type": "number"}, "revoked_at": {"type": "number", "nullable": True},
                "secret": {"type": "string", "description": "create only: the token, shown once"}}},
            "NewToken": {"type": "object", "required": ["name", "role"], "additionalProperties": False, "properties": {
                "name": _NAME,
                "role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}},
            "AuditRecord": {"type": "object", "properties": {
                "id": {"type": "string", "description": "sorts as the records' times do"},
                "at": {"type": "string", "format": "date-time"},
                "who": {"type": "string", "description": "the token's name (bootstrap: the control plane's own)"},
                "token_id": {"type": "string", "nullable": True}, "role": {"type": "string"},
                "source": {"type": "string", "description": "the client's address"},
                "action": {"type": "string", "description": "backends.add|drain|resume|remove, keys.create|set|"
                                                            "rotate|revoke, tokens.create|revoke"},
                "target": {"type": "string", "description": "the id of what changed"},
                "before": {"type": "object", "nullable": True}, "after": {"type": "object", "nullable": True}}},
            "Rotate": {"type": "object", "additionalProperties": False, "properties": {
                "grace_s": _schema(RotationGrace, description="how long the previous secret keeps working "
                                                               "(default: auth.rotation_grace_s)")}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {"get": {"security": [], "responses": {"200": {"description": "the control plane runs"}}}},
        "/openapi.json": {"get": {"security": [], "responses": {"200": {"description": "this document"}}}},
        "/status": {"get": {"summary": "endpoints with load and weight; connected Envoys",
                            "responses": _answers("200", {"type": "object"})}},
        "/backends": {
            "get": {"summary": "every backend", "responses": _answers("200", {"type": "object"})},
            "post": {"summary": "add a backend (routes and clusters for new models are made first)",
                     "requestBody": {"required": True,
                                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewBackend"}}}},
                     "responses": _answers("201", _BACKEND, "400", "409", "413")},
        },
        "/backends/{id}": {
            "parameters": _ID,
            "get": {"responses": _answers("200", _BACKEND, "404")},
            "delete": {"summary": "drain, then remove (force=true: remove now); API backends only",
                       "parameters": [{"name": "force", "in": "query", "schema": {"type": "boolean"}}],
                       "responses": _answers("202", _BACKEND, "400", "404", "409")},
        },
        "/backends/{id}/drain": {
            "parameters": _ID,
            "post": {"summary": "no new requests; removed (API, DNS) or parked (config) once idle",
                     "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Drain"}}}},
                     "responses": _answers("202", _BACKEND, "400", "404")},
        },
        "/backends/{id}/resume": {
            "parameters": _ID,
            "post": {"summary": "back into rotation", "responses": _answers("200", _BACKEND, "404")},
        },
        "/keys": {
            "get": {"summary": "every API key (never a secret) with its usage", "responses": _answers(
                "200", {"type": "object"})},
            "post": {"summary": "make a key; the answer holds its secret, shown only this once (name required)",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/KeyFields"}}}},
                     "responses": _answers("201", _KEY, "400", "409")},
        },
        "/keys/{id}": {
            "parameters": _ID,
            "get": {"responses": _answers("200", _KEY, "404")},
            "patch": {"summary": "change a key's name, models or class",
                      "requestBody": {"content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/KeyFields"}}}},
                      "responses": _answers("200", _KEY, "400", "404", "409")},
            "delete": {"summary": "revoke: every secret of the key stops working", "responses": _answers(
                "200", _KEY, "404", "409")},
        },
        "/keys/{id}/rotate": {
            "parameters": _ID,
            "post": {"summary": "a new secret; the previous one works for grace_s more",
                     "requestBody": {"content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/Rotate"}}}},
                     "responses": _answers("200", _KEY, "400", "404", "409")},
        },
        "/tokens": {
            "get": {"summary": "every named admin token (never a secret nor a digest)",
                    "responses": _answers("200", {"type": "object"})},
            "post": {"summary": "make a named admin token; the answer holds its secret, shown only this once",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/NewToken"}}}},
                     "responses": _answers("201", _TOKEN, "400", "409")},
        },
        "/tokens/{id}": {
            "parameters": _ID,
            "delete": {"summary": "revoke: the token stops working at once", "responses": _answers(
                "200", _TOKEN, "404", "409")},
        },
        "/usage": {
            "get": {"summary": "usage for billing: per UTC day, API key and model, summed over every control plane "
                               "and restart (requests; audio-seconds received, served, failed, refused, estimated, "
                               "corrected by the engines; mismatches); kept state.usage_days",
                    "parameters": [{"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}},
                                   {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}},
                                   {"name": "key", "in": "query", "schema": {"type": "string"}},
                                   {"name": "format", "in": "query", "schema": {"type": "string",
                                                                                 "enum": ["json", "csv"]}}],
                    "responses": _answers("200", {"type": "object", "properties": {
                        "from": {"type": "string", "format": "date"}, "to": {"type": "string", "format": "date"},
                        "data": {"type": "array", "items": {"type": "object"}}}}, "400", "503")},
        },
        "/audit": {
            "get": {"summary": "the admin changes' trail: with since, the first `limit` records from then on; "
                               "without, the newest `limit`; oldest first (has_more: some were left out)",
                    "parameters": [{"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                                   {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                                "maximum": 1000, "default": 100}}],
                    "responses": _answers("200", {"type": "object", "properties": {
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRecord"}},
                        "has_more": {"type": "boolean"}}}, "400")},
        },
    },
}
