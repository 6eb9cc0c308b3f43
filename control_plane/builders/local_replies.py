"""Every answer Envoy makes itself (no engine, timeout, too large, bad HTTP) in OpenAI's error shape.

The Lua filter's own answers are already OpenAI JSON: it marks them with dynamic metadata
(which, unlike a header, no client can send) before answering, and the first mapper passes
those through untouched.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import struct_pb2

from control_plane.builders.common import lua_marked, status_is
from control_plane.names import LIMITED_HEADER, LUA_REPLY_KEY
from control_plane.config import GatewayConfig
from control_plane.openai_errors import openai_error

Format = substitution_format_string_pb2.SubstitutionFormatString


def _json_error(message: str, error_type: str) -> Format:
    body = struct_pb2.Struct()
    body.update(openai_error(message, error_type, None, "%RESPONSE_CODE%"))
    return Format(json_format=body, content_type="application/json")


def _mapper(code: int, message: str, error_type: str) -> hcm.ResponseMapper:
    return hcm.ResponseMapper(filter=status_is(accesslog_pb2.ComparisonFilter.EQ, code, "local_reply"),
                              body_format_override=_json_error(message, error_type))


def _rate_limited() -> hcm.ResponseMapper:
    """A quota filter's 429 (builders/quotas.py), in OpenAI's shape: `type` names the limit
    (a key's requests, audio_seconds, audio_seconds_per_day or requests_in_flight; a model's
    batch_lane)."""
    body = struct_pb2.Struct()
    body.update(openai_error(f"Rate limit reached: %RESP({LIMITED_HEADER})%. Retry after the time in the Retry-After "
                             "header.", f"%RESP({LIMITED_HEADER})%", None, "rate_limit_exceeded"))
    return hcm.ResponseMapper(filter=status_is(accesslog_pb2.ComparisonFilter.EQ, 429, "local_reply"),
                              body_format_override=Format(json_format=body, content_type="application/json"))


def build_local_reply_config(config: GatewayConfig) -> hcm.LocalReplyConfig:
    lua_reply = lua_marked(LUA_REPLY_KEY)
    passthrough = Format(text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%"),
                         content_type="application/json")
    limit_mb = f"{config.limits.max_upload_mb:g}"
    mappers = [
        hcm.ResponseMapper(filter=lua_reply, body_format_override=passthrough),
        _mapper(413, f"Request body is larger than the gateway's upload limit of {limit_mb} MiB.",
                "RequestTooLargeError"),
        _mapper(408, f"The request was not received in time (limit {config.timeouts.request_s:g} s).",
                "RequestTimeoutError"),
        _mapper(431, f"Request headers are too large (limit {config.limits.max_request_headers_kb} kB "
                     "or 100 headers).", "BadRequestError"),
        _mapper(400, "Malformed HTTP request: %LOCAL_REPLY_BODY%", "BadRequestError"),
        _mapper(404, "%LOCAL_REPLY_BODY%", "NotFoundError"),
        _rate_limited(),
        _mapper(503, "No engine could take the request: %LOCAL_REPLY_BODY%", "ServiceUnavailableError"),
        _mapper(504, "The engine did not answer in time: %LOCAL_REPLY_BODY%", "TimeoutError"),
        hcm.ResponseMapper(filter=status_is(accesslog_pb2.ComparisonFilter.GE, 400, "local_reply"),
                           body_format_override=_json_error("%LOCAL_REPLY_BODY%", "GatewayError")),
    ]
    return hcm.LocalReplyConfig(mappers=mappers)
