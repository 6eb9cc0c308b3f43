"""Envoy's own answers (too large, ...) in OpenAI's error shape instead of plain text."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import struct_pb2

from control_plane.config import GatewayConfig


def _status_is(code: int) -> accesslog_pb2.AccessLogFilter:
    comparison = accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.EQ,
        value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"whisper_gateway.local_reply.{code}"),
    )
    return accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=comparison))


def _json_error(message: str, error_type: str, code: int) -> substitution_format_string_pb2.SubstitutionFormatString:
    body = struct_pb2.Struct()
    body.update({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    return substitution_format_string_pb2.SubstitutionFormatString(json_format=body, content_type="application/json")


def build_local_reply_config(config: GatewayConfig) -> hcm.LocalReplyConfig:
    limit_mb = f"{config.limits.max_upload_mb:g}"
    too_large = _json_error(f"Request body is larger than the gateway's upload limit of {limit_mb} MiB.",
                            "RequestTooLargeError", 413)
    return hcm.LocalReplyConfig(mappers=[hcm.ResponseMapper(filter=_status_is(413), body_format_override=too_large)])
