"""Per-key quotas: Envoy's local rate limit filters, one per per-minute limit, between the Lua filter and the router.

A key's limits come from its plan (auth.plans). The Lua filter sets the key's id, its plan and
what the request costs as dynamic metadata, which no client can send and which requests the
filter does not handle (`/v1/models`, `/health`) never carry; each filter has one descriptor per
plan whose key entry is a wildcard, so every key gets buckets of its own without being named
here. So the filters change only with the config file's plans, never with the keys: Envoy
rebuilds a rate limit filter's buckets full whenever its config changes, and making a key must
not refill everyone's. The buckets live in the listener (it changes only with the config file).

One budget across several Envoys: every Envoy's bucket holds the key's whole budget, in
BUDGET_SCALE tokens per request or audio-second, and each Envoy charges a key's requests its
charge (a multiple of their cost, at least 1) that the control plane sets from where the key's
traffic arrives (decide/budgets.py): spread over N Envoys, each charges about N times; all
through one, that one charges once. The control plane keeps the exact figure from the access
logs and raises the charges to repay what the Envoys admitted beyond it. A day's budget is not
a bucket here: the control plane counts it in the durable usage and refuses the key in the
routes once it is spent (envoy/plans.lua).

Each filter reports its own bucket in `x-ratelimit-*`; Envoy appends them (audio first, then
requests, as the responses pass back), and the Lua filter renames them to OpenAI's
`x-ratelimit-*-requests` and `-audio-seconds` (in units of the whole budget) and adds
Retry-After (envoy/plans.lua). A 429's `x-whisper-limited` says which limit refused it.

A plan's `requests_in_flight`, and `auth.batch_in_flight_per_engine`, are not rates: Envoy's
rate_limit_quota filters, first in line, hold a bucket per key (and per model's batch lane)
whose tokens the control plane grants from the requests in flight it counts in the access logs
(control_plane/xds/quota_service.py). They sit before the rate limits, so a request they refuse
spends no token of those.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.core.v3 import extension_pb2 as envoy_extension_pb2, grpc_service_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2 as rlq
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, ratelimit_strategy_pb2, token_bucket_pb2
from google.protobuf import wrappers_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from control_plane.builders.common import header, pack, seconds
from control_plane.config import GatewayConfig, PlanConfig
from control_plane.names import (AUDIO_SECONDS_LIMIT, BATCH_LANE_HEADER, BATCH_LANE_LIMIT, BUDGET_SCALE, COST_KEY,
                                 IN_FLIGHT_BUCKET_ENTRY, IN_FLIGHT_LIMIT, IN_FLIGHT_REPORT_S, KEY_ID_HEADER,
                                 KEY_ID_KEY, LIMITED_HEADER, METADATA_NAMESPACE, MINUTE_S, PLAN_KEY,
                                 REQUEST_COST_KEY, REQUESTS_LIMIT, XDS_CLUSTER)


@dataclass(frozen=True)
class Limit:
    """One limit every plan sets: what it is called, the PlanConfig field, and the metadata key
    of what a request costs it (BUDGET_SCALE tokens per unit, times the key's charge here)."""

    name: str  # x-whisper-limited on its 429s; the filter's stat prefix
    amount: str  # the PlanConfig field: units a minute
    cost_key: str


# In the order Envoy applies them. A request the first admits and a later one refuses has
# still spent the first's token (the filters do not refund), so the cheap limit goes first.
LIMITS = (
    Limit(REQUESTS_LIMIT, "requests_per_minute", REQUEST_COST_KEY),
    Limit(AUDIO_SECONDS_LIMIT, "audio_seconds_per_minute", COST_KEY),
)


def _all(runtime_key: str) -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED),
        runtime_key=runtime_key)


def _from_metadata(key: str, descriptor_key: str) -> rc.RateLimit.Action:
    """A descriptor entry from the Lua filter's dynamic metadata; absent: no descriptor, no charge."""
    return rc.RateLimit.Action(metadata=rc.RateLimit.Action.MetaData(
        descriptor_key=descriptor_key, source=rc.RateLimit.Action.MetaData.DYNAMIC, skip_if_absent=True,
        metadata_key=metadata_pb2.MetadataKey(key=METADATA_NAMESPACE,
                                              path=[metadata_pb2.MetadataKey.PathSegment(key=key)])))


def _filter(limit: Limit, plans: dict[str, PlanConfig], max_keys: int) -> hcm.HttpFilter | None:
    descriptors = []
    for name, plan in sorted(plans.items()):
        tokens = getattr(plan, limit.amount) * BUDGET_SCALE
        descriptors.append(ratelimit_pb2.LocalRateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=f"plan_{limit.name}", value=name),
                     ratelimit_pb2.RateLimitDescriptor.Entry(key="key", value="")],  # "": a bucket per key
            token_bucket=token_bucket_pb2.TokenBucket(  # refilled continuously, the whole budget a minute
                max_tokens=tokens, tokens_per_fill=wrappers_pb2.UInt32Value(value=tokens),
                fill_interval=seconds(MINUTE_S))))
    if not descriptors:
        return None
    rate_limit = rc.RateLimit(actions=[_from_metadata(PLAN_KEY, f"plan_{limit.name}"), _from_metadata(KEY_ID_KEY, "key")])
    rate_limit.hits_addend.format = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{limit.cost_key})%"
    config = lrl.LocalRateLimit(
        stat_prefix=f"whisper_quota_{limit.name}",
        filter_enabled=_all(f"whisper_gateway.quota.{limit.name}.enabled"),
        filter_enforced=_all(f"whisper_gateway.quota.{limit.name}.enforced"),
        descriptors=descriptors,
        rate_limits=[rate_limit],
        max_dynamic_descriptors=wrappers_pb2.UInt32Value(value=max_keys),
        response_headers_to_add=[header(LIMITED_HEADER, limit.name)],
        enable_x_ratelimit_headers=ratelimit_pb2.XRateLimitHeadersRFCVersion.DRAFT_VERSION_03,
    )
    return hcm.HttpFilter(name=f"whisper.quota.{limit.name}", typed_config=pack(config))


def _in_flight_filter(limit: str, group_header: str) -> hcm.HttpFilter:
    """A bucket per value of `group_header`, which the Lua filter sets (a key's id, a model's batch lane;
    a request without it is not limited), with the tokens the control plane grants; refused
    (429, x-whisper-limited: `limit`) when none is left. A slot frees when any of the group's
    requests ends: Retry-After 1 (whole seconds), and retry-after-ms 100, which OpenAI's SDKs
    read first."""
    group = envoy_extension_pb2.TypedExtensionConfig(
        name="group", typed_config=pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=group_header)))
    settings = rlq.RateLimitQuotaBucketSettings(
        bucket_id_builder=rlq.RateLimitQuotaBucketSettings.BucketIdBuilder(bucket_id_builder={
            IN_FLIGHT_BUCKET_ENTRY: rlq.RateLimitQuotaBucketSettings.BucketIdBuilder.ValueBuilder(custom_value=group)}),
        reporting_interval=seconds(IN_FLIGHT_REPORT_S),
        deny_response_settings=rlq.RateLimitQuotaBucketSettings.DenyResponseSettings(
            http_status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
            response_headers_to_add=[header(LIMITED_HEADER, limit), header("retry-after", "1"),
                                     header("retry-after-ms", "100")]),
        no_assignment_behavior=rlq.RateLimitQuotaBucketSettings.NoAssignmentBehavior(
            fallback_rate_limit=ratelimit_strategy_pb2.RateLimitStrategy(
                blanket_rule=ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL)))
    config = rlq.RateLimitQuotaFilterConfig(
        rlqs_server=grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
            cluster_name=XDS_CLUSTER)),
        domain=METADATA_NAMESPACE,
        bucket_matchers=matcher_pb2.Matcher(on_no_match=matcher_pb2.Matcher.OnMatch(
            action=extension_pb2.TypedExtensionConfig(name="per_group", typed_config=pack(settings)))))
    return hcm.HttpFilter(name=f"whisper.quota.{limit}", typed_config=pack(config))


def _key_limits(config: GatewayConfig) -> bool:
    return any(p.requests_in_flight for p in config.auth.plans.values())


def limits_in_flight(config: GatewayConfig) -> bool:
    """Whether any in-flight filter is built: the control plane then counts requests to the end."""
    auth = config.auth
    return auth.api_keys == "required" and (auth.batch_in_flight_per_engine is not None or _key_limits(config))


def build_quota_filters(config: GatewayConfig) -> list[hcm.HttpFilter]:
    """The quota filters of the config's plans and batch lanes; none when keys are off."""
    auth = config.auth
    if auth.api_keys != "required":
        return []
    built = [_in_flight_filter(BATCH_LANE_LIMIT, BATCH_LANE_HEADER) if auth.batch_in_flight_per_engine else None,
             _in_flight_filter(IN_FLIGHT_LIMIT, KEY_ID_HEADER) if _key_limits(config) else None]
    if auth.plans:
        built += [_filter(limit, auth.plans, auth.max_keys) for limit in LIMITS]
    return [f for f in built if f is not None]
