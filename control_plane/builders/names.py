"""Names shared by the builders, the Lua filter and the tests."""

LISTENER_NAME = "whisper_http"
ROUTE_CONFIG_NAME = "whisper_routes"
VIRTUAL_HOST_NAME = "whisper"
# Set by the Lua filter from the multipart `model` field; routes match on it.
MODEL_HEADER = "x-whisper-model"
LUA_FILTER = "envoy.filters.http.lua"
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


def cluster_name(model: str) -> str:
    return f"model:{model}"

# A cluster with no endpoints, for requests that reach no model route.
UNROUTED_CLUSTER = "whisper:unrouted"
