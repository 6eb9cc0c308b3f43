"""Small protobuf helpers the builders share."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.type.matcher.v3 import metadata_pb2, value_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from control_plane.names import LB_METADATA, LONG_UPLOAD_KEY, METADATA_NAMESPACE


def pack(message: Message) -> any_pb2.Any:
    """Deterministic bytes (map fields sorted), so equal config gives equal versions in every process."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message, deterministic=True)
    return wrapped


def lua_marked(key: str) -> accesslog_pb2.AccessLogFilter:
    """Matches requests on which the Lua filter set dynamic metadata METADATA_NAMESPACE.`key`."""
    return accesslog_pb2.AccessLogFilter(metadata_filter=accesslog_pb2.MetadataFilter(
        matcher=metadata_pb2.MetadataMatcher(
            filter=METADATA_NAMESPACE, path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
            value=value_pb2.ValueMatcher(present_match=True)),
        match_if_key_not_found=wrappers_pb2.BoolValue(value=False)))


def status_is(op: int, code: int, name: str) -> accesslog_pb2.AccessLogFilter:
    """Matches responses whose status compares to `code` by `op` (ComparisonFilter.EQ, GE, LE);
    `name` makes the runtime key Envoy requires unique."""
    comparison = accesslog_pb2.ComparisonFilter(
        op=op, value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"whisper_gateway.{name}.{code}"))
    return accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=comparison))


def ads_source() -> config_source_pb2.ConfigSource:
    """Fetched over the ADS stream: the endpoints, route configuration and secrets named in others."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def header(name: str, value: str) -> base_pb2.HeaderValueOption:
    """A header set to `value`, replacing any the message already has."""
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value),
                                      append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


JSON_HEADER = header("content-type", "application/json")  # on the gateway's own JSON answers


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(round(value * 1e9)))
    return duration


def long_upload_metadata() -> base_pb2.Metadata:
    """What marks an endpoint for long uploads, and what their routes' metadata_match asks for."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[LB_METADATA].update({LONG_UPLOAD_KEY: True})
    return metadata
