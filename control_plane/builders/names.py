"""Names shared by the builders, the Lua filter and the tests."""

LISTENER_NAME = "whisper_http"
ROUTE_CONFIG_NAME = "whisper_routes"
VIRTUAL_HOST_NAME = "whisper"
# Set by the Lua filter from the multipart `model` field; routes match on it.
MODEL_HEADER = "x-whisper-model"
# Set by the Lua filter on uploads of at least routing.long_upload_kb; their routes select the
# endpoints whose LB_METADATA carries LONG_UPLOAD_KEY (control_plane/policy.py picks them).
LONG_UPLOAD_HEADER = "x-whisper-long-upload"
LB_METADATA = "envoy.lb"
LONG_UPLOAD_KEY = "long_uploads"
LUA_FILTER = "envoy.filters.http.lua"
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


def cluster_name(model: str) -> str:
    return f"model:{model}"

# A cluster with no endpoints, for requests that reach no model route.
UNROUTED_CLUSTER = "whisper:unrouted"
