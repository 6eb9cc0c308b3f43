"""The admin API described for machines (served at /openapi.json)."""

_ERROR = {"$ref": "#/components/schemas/Error"}
_BACKEND = {"$ref": "#/components/schemas/Backend"}


def _answers(ok_status: str, ok_schema: dict, *errors: str) -> dict:
    responses = {ok_status: {"description": "OK", "content": {"application/json": {"schema": ok_schema}}}}
    for status in ("401", *errors):
        responses[status] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    return responses


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "whisper-gateway admin API", "version": "1"},
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
                "weight": {"type": "integer", "minimum": 1, "maximum": 128},
                "source": {"type": "string", "description": "config, api, or dns:<name>"},
                "state": {"type": "string", "enum": ["active", "draining", "drained"]},
                "drain_deadline": {"type": "number", "nullable": True},
                "endpoints": {"type": "array", "items": {"type": "object"}}}},
            "NewBackend": {"type": "object", "required": ["url"], "additionalProperties": False, "properties": {
                "url": {"type": "string", "description": (
                    "http://host:port, no path or user info; host is a dotted IPv4 address, a bracketed IPv6 "
                    "address without a zone id, or a host name that resolves; link-local, unspecified, "
                    "multicast addresses and the gateway's own ports are refused")},
                "models": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 32,
                           "description": "default: read from the engine's /v1/models"},
                "weight": {"type": "integer", "minimum": 1, "maximum": 128}}},
            "Drain": {"type": "object", "additionalProperties": False, "properties": {
                "timeout_s": {"type": "number", "minimum": 1, "maximum": 86400}}},
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
    },
}
