"""Names shared by the builders, the Lua filter, the access-log reader and the tests."""

LISTENER_NAME = "whisper_http"
ROUTE_CONFIG_NAME = "whisper_routes"
VIRTUAL_HOST_NAME = "whisper"
# Set by the Lua filter from the multipart `model` field; routes match on it.
MODEL_HEADER = "x-whisper-model"
# Set by the Lua filter on uploads of at least routing.long_upload_kb; their routes select the
# endpoints whose LB_METADATA carries LONG_UPLOAD_KEY (control_plane/decide/policy.py picks them).
LONG_UPLOAD_HEADER = "x-whisper-long-upload"
LB_METADATA = "envoy.lb"
# Added to every request Envoy proxies; the Lua filter answers 508 to one that arrives with it.
HOP_HEADER = "x-whisper-gateway-hop"
# Set by the Lua filter on every request it routes: the upload's audio-seconds, and "1" when
# that is an estimate (envoy/audio_duration.lua); a client's own values are replaced.
AUDIO_SECONDS_HEADER = "x-whisper-audio-seconds"
AUDIO_ESTIMATED_HEADER = "x-whisper-audio-estimated"
# Set by the Lua filter when keys are required: the id of the key a request was admitted with
# (for the try logs); the quota filters say on a 429 which limit refused it.
KEY_ID_HEADER = "x-whisper-key-id"
LIMITED_HEADER = "x-whisper-limited"
IN_FLIGHT_LIMIT = "requests_in_flight"  # the plan's field, and x-whisper-limited on its 429s
# Set by the Lua filter on a batch key's request when auth.batch_in_flight_per_engine is set: the
# model's batch lane (`batch_lane(model)`), whose requests in flight it counts in; the lane's
# 429s say x-whisper-limited: batch_lane.
BATCH_LANE_HEADER = "x-whisper-batch-lane"
BATCH_LANE_KEY = "batch_lane"  # the same as dynamic metadata, for the request's own log
BATCH_LANE_LIMIT = "batch_lane"
# Long recordings (control_plane/longform/): the Lua filter sets LONGFORM_HEADER on an admitted
# upload longer than longform.split_above_s, whose route goes to the longform workers
# (LONGFORM_CLUSTER), with how many of its pieces may be at the engines at once. A worker sends
# each piece to the pieces listener (a Unix socket only the gateway's user may reach), whose
# own filter marks it (PIECE_FILTER): routed, retried and hedged like any request, counted in its
# engine's load, but never admitted, charged or metered again (the recording was, once).
LONGFORM_HEADER = "x-whisper-longform"
LONGFORM_PARALLEL_HEADER = "x-whisper-longform-parallel"
LONGFORM_CLUSTER = "whisper:longform"
PIECES_LISTENER_NAME = "whisper_pieces"
PIECE_FILTER = "whisper.piece"
PIECE_HEADER = "x-whisper-piece"
PIECE_KEY = "piece"
# On a recording's answer, from its worker: the seconds its audio decodes to (metered by, as an
# engine's own figure is); LONGFORM_KEY marks a recording in the dynamic metadata.
RECORDING_SECONDS_HEADER = "x-whisper-recording-seconds"
LONGFORM_KEY = "longform"
# An upload too large to buffer (over limits.max_upload_mb by its Content-Length) streams to a
# worker with LONGFORM_HEADER: LONGFORM_STREAMED, admitted at its headers by key alone. Its worker
# spools it, then asks the pieces listener to admit the rest (ADMIT_MODEL_HEADER: the form's
# model, ADMIT_KEY_HEADER: the key's id, RECORDING_SECONDS_HEADER: its length), which answers as
# it would the upload (404, 403, 429) or 204; the recording's answer names its model
# (RECORDING_MODEL_HEADER), and its log (STREAMED_KEY) meters it by its worker's figures.
LONGFORM_STREAMED = "streamed"
ADMIT_MODEL_HEADER = "x-whisper-admit-model"
ADMIT_KEY_HEADER = "x-whisper-admit-key"
RECORDING_MODEL_HEADER = "x-whisper-recording-model"
STREAMED_KEY = "streamed"
# What Envoy buffers of a streamed upload (its route's request_body_buffer_limit; its flow
# control holds the rest back at the client), which envoy/uploads.lua admits it by, twice over.
STREAMED_BUFFER_BYTES = 1048576
# The in-flight filters' buckets (builders/quotas.py, xds/quota_service.py): the bucket id's entry
# that names the group (a key's id, a model's batch lane), and how often Envoy reports each
# bucket (each report is answered with fresh grants).
IN_FLIGHT_BUCKET_ENTRY = "group"
IN_FLIGHT_REPORT_S = 2
# The quota filters' rate limits (builders/quotas.py): what x-whisper-limited says on each one's
# 429s, and the windows their budgets refill over (the Lua filter's Retry-After reads them).
REQUESTS_LIMIT = "requests"
AUDIO_SECONDS_LIMIT = "audio_seconds"
AUDIO_SECONDS_PER_DAY_LIMIT = "audio_seconds_per_day"
MINUTE_S = 60
DAY_S = 86400
# The per-minute buckets hold BUDGET_SCALE tokens per request or audio-second, so an Envoy can
# charge a key's uploads a fractional multiple of their cost (its share: decide/budgets.py).
BUDGET_SCALE = 250


BATCH_LANE_PREFIX = "batch:"


def batch_lane(model: str) -> str:
    """The group a model's batch requests count in (a key's group is its id)."""
    return BATCH_LANE_PREFIX + model


def is_batch_lane(group: str) -> bool:
    return group.startswith(BATCH_LANE_PREFIX)


# Dynamic metadata the Lua filter sets (a client cannot forge it): LUA_REPLY_KEY on its own
# answers (their OpenAI code, or their status, shown in traces); MODEL_KEY, SECONDS_KEY and
# ESTIMATED_KEY on every request it routes (the log of
# failed requests meters those, never headers a client could have sent).
METADATA_NAMESPACE = "whisper_gateway"
LUA_REPLY_KEY = "lua_reply"
MODEL_KEY = "model"
SECONDS_KEY = "audio_seconds"
ESTIMATED_KEY = "audio_estimated"
KEY_ID_KEY = "key_id"
# On a request that named an alias: the name it used (MODEL_KEY is the model it stands for), for traces.
REQUESTED_MODEL_KEY = "requested_model"
# On a routed 2xx whose answer carries the engine's own duration (`usage.seconds`, or
# verbose_json's `duration`) and which differs from the edge's: that figure, which corrects
# the metering (envoy/model_router.lua's response side; observe/access_logs.py).
ENGINE_SECONDS_KEY = "audio_engine_seconds"
# On an upload whose container claimed less audio than its data holds (a patched header): the
# claim, which was not believed (envoy/audio_duration.lua). Its request is logged as a mismatch.
CLAIMED_KEY = "audio_claimed"
# On an upload whose duration was checked against its data (not a header's claim or an estimate):
# its answer's body need not be read for the engine's figure (envoy/metering.lua).
CHECKED_KEY = "audio_checked"
# With a key that has a plan: the plan, and what the quota filters charge (builders/quotas.py),
# in BUDGET_SCALE tokens: the upload's whole audio-seconds (at least 1) and its 1 request, each
# times the key's charge on this Envoy (tenants/keys.py Grant, envoy/plans.lua).
PLAN_KEY = "plan"
COST_KEY = "audio_cost"
REQUEST_COST_KEY = "request_cost"
LONG_UPLOAD_KEY = "long_uploads"
LUA_FILTER = "envoy.filters.http.lua"
# The listener's second Lua filter, before LUA_FILTER: the same source, run for upload admission
# only (builders/listener.py). No route overrides it, so its state lives as long as the listener.
UPLOAD_FILTER = "whisper.upload_admission"
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")

# What the Lua filter uses of these, by the same names: builders/lua_source.py writes them ahead
# of its source as `local NAMES = {...}`, and envoy/*.lua takes each from there, never a copy
# typed in (tests/test_names_agree.py finds one).
# The environment variable that tells the Lua filter how many worker threads Envoy runs (each
# admits uploads against its share of limits.max_heap_mb: envoy/uploads.lua).
WORKERS_ENV = "WHISPER_GATEWAY_WORKERS"

LUA_NAMES = {name: globals()[name] for name in (
    "MODEL_HEADER", "LONG_UPLOAD_HEADER", "HOP_HEADER", "AUDIO_SECONDS_HEADER", "AUDIO_ESTIMATED_HEADER",
    "KEY_ID_HEADER", "LIMITED_HEADER", "BATCH_LANE_HEADER", "LONGFORM_HEADER", "LONGFORM_PARALLEL_HEADER", "PIECE_HEADER",
    "PIECE_KEY", "RECORDING_SECONDS_HEADER", "LONGFORM_KEY",
    "LONGFORM_STREAMED", "ADMIT_MODEL_HEADER", "ADMIT_KEY_HEADER", "RECORDING_MODEL_HEADER", "STREAMED_KEY", "BATCH_LANE_PREFIX", "BATCH_LANE_LIMIT",
    "REQUESTS_LIMIT", "AUDIO_SECONDS_LIMIT", "MINUTE_S", "METADATA_NAMESPACE", "LUA_REPLY_KEY",
    "MODEL_KEY", "SECONDS_KEY", "ESTIMATED_KEY", "KEY_ID_KEY", "REQUESTED_MODEL_KEY", "BATCH_LANE_KEY", "PLAN_KEY", "COST_KEY", "WORKERS_ENV",
    "REQUEST_COST_KEY", "BUDGET_SCALE", "AUDIO_SECONDS_PER_DAY_LIMIT",
    "ENGINE_SECONDS_KEY", "CLAIMED_KEY", "CHECKED_KEY")}


def cluster_name(model: str) -> str:
    return f"model:{model}"

# A cluster with no endpoints, for requests that reach no model route.
UNROUTED_CLUSTER = "whisper:unrouted"

# The bootstrap's static cluster to the control plane (ADS, and the upstream-try log).
XDS_CLUSTER = "xds_cluster"
# The gRPC access logs of every upstream try and every request (control_plane/observe/access_logs.py).
UPSTREAM_LOG_NAME = "whisper_upstream_tries"
REQUEST_LOG_NAME = "whisper_requests"
# The cluster of the OpenTelemetry collector that traces go to (observability.tracing.otlp_endpoint;
# published over CDS only while it is set: builders/tracing.py), and the service the spans name.
OTLP_CLUSTER = "whisper_otlp"
TRACING_SERVICE_NAME = "whisper-gateway"

# An answer the engine (or the way to it) cut short after its 2xx headers: the flags Envoy sets
# both on the try's log entry and on the request's, by field name and short name. Metered as
# failed, once, from the request's log (control_plane/observe/access_logs.py).
CUT_SHORT_FLAGS = {"upstream_remote_reset": "UR", "upstream_connection_termination": "UC",
                   "upstream_protocol_error": "UPE", "upstream_max_stream_duration_reached": "UMSDR"}

# SDS secrets the control plane serves from the configured PEM files (control_plane/certificates.py).
LISTENER_CERT_SECRET = "listener_certificate"
CLIENT_CA_SECRET = "client_ca"
BACKEND_CA_SECRET = "backend_ca"
BACKEND_CLIENT_SECRET = "backend_client_certificate"
# The endpoint metadata key (xds.types.TLS_MATCH_NAMESPACE) that selects TLS to an https:// engine.
TLS_MATCH_KEY = "tls"
NO_ENGINE_CA = ("https:// engines need a CA to be checked against: set backend_tls.ca_file (this system has no CA "
                "bundle; install ca-certificates)")
