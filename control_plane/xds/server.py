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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

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
class _Sent:
    """What one response carried: for types fetched by name, each resource's content hash."""

    version: str
    hashes: dict[str, str] | None  # None: a wildcard type (the whole set)


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None  # None: wildcard
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    # Per resource (types fetched by name): what Envoy holds or is being sent, what it ACKed, and
    # what it refused (not sent again until its content changes).
    sent_hashes: dict[str, str] = field(default_factory=dict)
    applied: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    in_flight: dict[str, _Sent] = field(default_factory=dict)  # by nonce, oldest first
    # After a NACKed response of several resources: those resources, sent one per response until
    # the one Envoy refuses is known. Envoy applies a batch resource by resource and stops at the
    # bad one, so what else it took is unknown: each is sent again.
    isolate: list[str] = field(default_factory=list)
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
        type_url = request.type_url
        state = self.types.get(type_url)
        if state is None:
            log.warning("stream %d asked for unsupported type %s", self.stream_id, type_url)
            return
        if request.response_nonce:
            nonce = request.response_nonce
            if nonce not in state.in_flight and nonce != state.nonce:
                return  # answers an older response; a newer one is on its way
            if nonce in state.in_flight:  # else: the newest nonce again, only the subscription changes
                await self._on_answer(type_url, state, request)
            if nonce != state.nonce:
                return  # a newer response is on its way; its answer carries the current subscription
        state.subscribed = True
        if type_url in WILDCARD_TYPES:
            state.names = None
        else:
            state.names = frozenset(request.resource_names)

    async def _on_answer(self, type_url: str, state: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        """An ACK or NACK of a response in flight; those sent before it got no answer of their own."""
        for older in list(state.in_flight):
            if older == request.response_nonce:
                break
            self._forget(state, state.in_flight.pop(older))  # outcome unknown: sent again where it differs
        sent = state.in_flight.pop(request.response_nonce)
        if not state.in_flight:
            self.cache.record_settled(self.stream_id, type_url)
        if request.HasField("error_detail"):
            self._on_nack(type_url, state, sent, request.error_detail.message)
            return
        state.acked_version = request.version_info
        for name, digest in (sent.hashes or {}).items():
            state.applied[name] = digest
            if state.rejected.pop(name, None) is not None:
                self.cache.record_rejection(self.stream_id, type_url, name, None)
        await self.cache.record_ack(self.stream_id, type_url, request.version_info, sent.hashes)

    @staticmethod
    def _forget(state: _TypeState, sent: _Sent) -> None:
        """What a response carried is not known to be applied: it is sent again where it differs."""
        for name in sent.hashes or {}:
            if name in state.applied:
                state.sent_hashes[name] = state.applied[name]
            else:
                state.sent_hashes.pop(name, None)

    def _on_nack(self, type_url: str, state: _TypeState, sent: _Sent, message: str) -> None:
        self.cache.record_nack(self.stream_id, type_url, sent.version, message)
        if sent.hashes is None:
            return  # a wildcard set: Envoy keeps its last good one, and this version is not resent
        self._forget(state, sent)
        if len(sent.hashes) == 1:
            (name, digest), = sent.hashes.items()
            state.rejected[name] = digest
            self.cache.record_rejection(self.stream_id, type_url, name, message, digest)
        else:
            state.isolate = sorted(set(state.isolate) | set(sent.hashes))

    def responses(self, snapshot: Snapshot) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        for type_url in SEND_ORDER:
            state = self.types[type_url]
            if not state.subscribed or (state.names is not None and not state.names):
                continue
            if type_url in (LISTENER, ROUTE) and not self._clusters_ready(snapshot):
                continue
            version = snapshot.versions[type_url]
            if state.names is None:
                if state.sent_version == version and not state.resend:
                    continue
                names = None
            else:
                self._settle_rejections(type_url, state, snapshot)
                names = self._names_to_send(type_url, state, snapshot)
                if state.isolate and names:
                    if state.in_flight:
                        continue  # one resource at a time until the refused one is known
                    while state.isolate and state.isolate[0] not in names:
                        state.isolate.pop(0)
                    if state.isolate:
                        names = frozenset([state.isolate.pop(0)])
                if not names:
                    # Nothing this Envoy asked for is missing; it is up to date with this version.
                    state.sent_version, state.sent_names, state.resend = version, state.names, False
                    continue
            out.append(self._respond(type_url, state, snapshot, names))
            if type_url == CLUSTER:
                # A changed cluster warms until its endpoints arrive, even when its name did not change.
                self.types[ENDPOINT].resend = True
        return out

    def _respond(self, type_url: str, state: _TypeState, snapshot: Snapshot,
                 names: frozenset[str] | None) -> discovery_pb2.DiscoveryResponse:
        version, nonce = snapshot.versions[type_url], str(next(self._nonces))
        hashes = None
        if names is not None:
            hashes = {n: snapshot.hashes[type_url][n] for n in names}
            state.sent_hashes.update(hashes)
            state.sent_names = state.names
        state.in_flight[nonce] = _Sent(version, hashes)
        self.cache.record_sent(self.stream_id, type_url)
        state.sent_version, state.nonce, state.resend = version, nonce, False
        return discovery_pb2.DiscoveryResponse(version_info=version, resources=snapshot.select(type_url, names),
                                               type_url=type_url, nonce=nonce)

    def _settle_rejections(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> None:
        """A refused resource whose content went back to what Envoy holds is refused no more."""
        current = snapshot.hashes[type_url]
        for name in [n for n, digest in state.rejected.items() if current.get(n) != digest]:
            if name not in current or state.applied.get(name) == current[name]:
                del state.rejected[name]
                self.cache.record_rejection(self.stream_id, type_url, name, None)

    @staticmethod
    def _names_to_send(type_url: str, state: _TypeState, snapshot: Snapshot) -> frozenset[str]:
        """The asked names whose current content this stream has not sent, less what Envoy refused."""
        current = snapshot.hashes[type_url]
        everything = state.resend or state.sent_names != state.names
        return frozenset(n for n in state.names if n in current and state.rejected.get(n) != current[n]
                         and (everything or state.sent_hashes.get(n) != current[n]))

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
        # Endpoints Envoy refused do not hold the routes back: it keeps its last good ones.
        return (endpoints.names is not None and needed <= endpoints.names and not endpoints.isolate
                and not self._names_to_send(ENDPOINT, endpoints, snapshot))


# Who may hold a stream: (context, the node id once the stream names it) -> the peer's label, or
# the context is aborted (control_plane/peers.py). The default takes every peer as it says.
Authorize = Callable[[grpc.aio.ServicerContext, str | None], Awaitable[str]]


async def allow_all(context: grpc.aio.ServicerContext, node_id: str | None = None) -> str:
    return context.peer()


async def read_into(requests, inbox: deque, wake: asyncio.Event) -> None:
    """Moves a bidirectional stream's requests into `inbox`, waking `wake` for each, and a None
    when the stream ends: the servicer's loop answers both them and changes of its own."""
    try:
        async for request in requests:
            inbox.append(request)
            wake.set()
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    finally:
        inbox.append(None)
        wake.set()


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, authorize: Authorize = allow_all):
        self.cache = cache
        self.authorize = authorize
        self._ids = itertools.count(1)

    async def StreamAggregatedResources(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        stream = AdsStream(next(self._ids), self.cache)
        await self.authorize(context, None)
        inbox: deque = deque()
        wake = self.cache.watch()
        reader = asyncio.create_task(read_into(request_iterator, inbox, wake))
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
                        identity = await self.authorize(context, request.node.id)  # the first request names it
                        opened = True
                        self.cache.stream_opened(EnvoyStatus(stream.stream_id, request.node.id, request.node.cluster,
                                                             context.peer(), identity))
                    await stream.on_request(request)
                snapshot = self.cache.snapshot
                if snapshot is None:
                    continue
                for response in stream.responses(snapshot):
                    log.debug("stream %d: %s version %s (%d resources)", stream.stream_id,
                              SHORT_NAMES[response.type_url], response.version_info, len(response.resources))
                    await context.write(response)
                    self.cache.callbacks.on_push(response.type_url)
        finally:
            reader.cancel()
            self.cache.unwatch(wake)
            self.cache.stream_closed(stream.stream_id)


async def start_ads_server(cache: SnapshotCache, address: str, port: int,
                           more_services: Sequence[Callable[[grpc.aio.Server], None]] = (),
                           credentials: grpc.ServerCredentials | None = None,
                           authorize: Authorize = allow_all) -> grpc.aio.Server:
    """ADS, plus whatever else Envoys reach on the same port (`more_services` add their servicers);
    over mutual TLS with `credentials` (control_plane/peers.py), else plaintext."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscoveryServicer(cache, authorize), server)
    for add in more_services:
        add(server)
    target = f"{address}:{port}"
    bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot listen for xDS on {address}:{port}")
    await server.start()
    return server
