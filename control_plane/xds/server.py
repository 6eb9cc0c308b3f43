"""The ADS server (state of the world) that every Envoy keeps one stream open to.

Per stream and per type: a nonce on every response, stale requests ignored, ACK when the
request echoes the sent version, NACK when it carries error_detail (recorded, and the same bad
version is never resent). Responses go out in make-before-break order and only on change; a
listener or route is held back until the clusters it needs have their endpoints. Endpoints
and routes (subscribed by name) are sent as only the resources that changed; Envoy keeps the
ones a response leaves out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.telemetry import PUSHES
from control_plane.xds.cache import EnvoyStatus, SnapshotCache
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SEND_ORDER, SHORT_NAMES, WILDCARD_TYPES

log = logging.getLogger(__name__)

# Envoy pings idle ADS connections; without permission gRPC answers with GOAWAY.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None  # None: wildcard
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    sent_hashes: dict[str, str] = field(default_factory=dict)  # per resource, for types fetched by name
    nonce: str = ""
    acked_version: str | None = None
    resend: bool = False


class AdsStream:
    """The protocol state of one stream; no I/O, so its rules are easy to follow and test."""

    def __init__(self, stream_id: int, cache: SnapshotCache):
        self.stream_id = stream_id
        self.cache = cache
        self.types = {type_url: _TypeState() for type_url in SEND_ORDER}
        self._nonces = itertools.count(1)

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        state = self.types.get(request.type_url)
        if state is None:
            log.warning("stream %d asked for unsupported type %s", self.stream_id, request.type_url)
            return
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                return  # answers an older response; a newer one is on its way
            if request.HasField("error_detail"):
                self.cache.record_nack(self.stream_id, request.type_url, state.sent_version or "",
                                       request.error_detail.message)
            else:
                state.acked_version = request.version_info
                await self.cache.record_ack(self.stream_id, request.type_url, request.version_info)
        state.subscribed = True
        if request.type_url in WILDCARD_TYPES:
            state.names = None
        else:
            state.names = frozenset(request.resource_names)

    def responses(self, snapshot: Snapshot) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        for type_url in SEND_ORDER:
            state = self.types[type_url]
            if not state.subscribed or (state.names is not None and not state.names):
                continue
            version = snapshot.versions[type_url]
            due = state.sent_version != version or state.sent_names != state.names or state.resend
            if not due:
                continue
            if type_url in (LISTENER, ROUTE) and not self._clusters_ready(snapshot):
                continue
            names = self._names_to_send(type_url, state, snapshot)
            if names is not None and not names:
                # Nothing this Envoy asked for changed; it is up to date with this version.
                state.sent_version = version
                continue
            nonce = str(next(self._nonces))
            out.append(discovery_pb2.DiscoveryResponse(
                version_info=version, resources=snapshot.select(type_url, names), type_url=type_url, nonce=nonce,
            ))
            if names is not None:
                state.sent_hashes.update({n: snapshot.hashes[type_url][n] for n in names if n in snapshot.hashes[type_url]})
            state.sent_version, state.sent_names, state.nonce = version, state.names, nonce
            state.resend = False
            if type_url == CLUSTER:
                # A changed cluster warms until its endpoints arrive, even when its name did not change.
                self.types[ENDPOINT].resend = True
        return out

    @staticmethod
    def _names_to_send(type_url: str, state: _TypeState, snapshot: Snapshot) -> frozenset[str] | None:
        """None: everything (wildcard types). Else the asked names whose content this stream lacks."""
        if state.names is None:
            return None
        current = snapshot.hashes[type_url]
        if state.resend or state.sent_names != state.names:
            return frozenset(n for n in state.names if n in current)
        return frozenset(n for n in state.names if n in current and state.sent_hashes.get(n) != current[n])

    def _clusters_ready(self, snapshot: Snapshot) -> bool:
        """Clusters applied and every one of them given its endpoints: routes may now point at them."""
        clusters, endpoints = self.types[CLUSTER], self.types[ENDPOINT]
        # Applied, not merely answered: after a NACK Envoy lacks these clusters, so routes to them
        # wait (Envoy keeps serving its last good routes) until a good cluster set is ACKed.
        if clusters.acked_version != snapshot.versions[CLUSTER]:
            return False
        needed = snapshot.names(ENDPOINT)  # the EDS clusters; static ones carry their endpoints
        if not needed:
            return True
        return (
            endpoints.sent_version == snapshot.versions[ENDPOINT]
            and not endpoints.resend
            and endpoints.sent_names is not None
            and needed <= endpoints.sent_names
        )


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self._ids = itertools.count(1)

    async def StreamAggregatedResources(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        stream = AdsStream(next(self._ids), self.cache)
        inbox: deque = deque()
        wake = self.cache.watch()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    inbox.append(request)
                    wake.set()
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                inbox.append(None)
                wake.set()

        reader = asyncio.create_task(read())
        opened = False
        try:
            while True:
                await wake.wait()
                wake.clear()
                while inbox:
                    request = inbox.popleft()
                    if request is None:
                        return
                    if not opened:
                        opened = True
                        self.cache.stream_opened(EnvoyStatus(stream.stream_id, request.node.id, request.node.cluster,
                                                             context.peer()))
                    await stream.on_request(request)
                snapshot = self.cache.snapshot
                if snapshot is None:
                    continue
                for response in stream.responses(snapshot):
                    log.debug("stream %d: %s version %s (%d resources)", stream.stream_id,
                              SHORT_NAMES[response.type_url], response.version_info, len(response.resources))
                    await context.write(response)
                    PUSHES.labels(SHORT_NAMES[response.type_url]).inc()
        finally:
            reader.cancel()
            self.cache.unwatch(wake)
            self.cache.stream_closed(stream.stream_id)


async def start_ads_server(cache: SnapshotCache, address: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscoveryServicer(cache), server)
    bound = server.add_insecure_port(f"{address}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for xDS on {address}:{port}")
    await server.start()
    return server
