"""Lightweight Envoys for bench/scale.py: real gRPC ADS streams that subscribe and ACK as Envoy does.

Each stream subscribes to clusters and listeners (wildcard). On a cluster response it ACKs and
asks for the endpoints of every EDS cluster named, plus the Envoys' own cluster, as Envoy's
bootstrap does. On a listener response it asks for the route configuration the listener names.
It ACKs everything. For every response it records when it arrived, its type, version and size
in bytes. At the end (SIGTERM or --seconds) it writes them as JSON lines, for the bench to read.

    python -m bench.ads_clients --xds 127.0.0.1:18000 --streams 100 --out clients.jsonl [--pki DIR]

With --pki (the control plane's internal_tls folder) every channel speaks mutual TLS with the
certificate envoy-bench-envoy, and stream i is node bench-envoy.i, as a replica of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

STREAMS_PER_CHANNEL = 100
IDENTITY = "bench-envoy"  # with --pki: the certificate every stream shows


def _eds_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    names = []
    for resource in response.resources:
        cluster = cluster_pb2.Cluster()
        resource.Unpack(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.append(cluster.name)
    return sorted(names)


def _route_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    names = set()
    for resource in response.resources:
        listener = listener_pb2.Listener()
        resource.Unpack(listener)
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                manager = hcm.HttpConnectionManager()
                if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                    names.add(manager.rds.route_config_name)
    return sorted(names)


async def one_stream(channel: grpc.aio.Channel, index: int, records: list) -> None:
    """An Envoy's ADS stream until cancelled; appends (stream, type, version, bytes, time) per response."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    node = base_pb2.Node(id=f"{IDENTITY}.{index}", cluster="whisper-gateway")
    outbox: asyncio.Queue = asyncio.Queue()
    subscribed: dict[str, list[str]] = {}

    async def requests():
        while True:
            yield await outbox.get()

    for type_url in (CLUSTER, LISTENER):
        outbox.put_nowait(discovery_pb2.DiscoveryRequest(node=node, type_url=type_url))
    async for response in stub.StreamAggregatedResources(requests()):
        records.append((index, response.type_url, response.version_info, response.ByteSize(), time.monotonic()))
        outbox.put_nowait(discovery_pb2.DiscoveryRequest(
            node=node, type_url=response.type_url, version_info=response.version_info, response_nonce=response.nonce,
            resource_names=subscribed.get(response.type_url, [])))
        follow = {CLUSTER: (ENDPOINT, _eds_names), LISTENER: (ROUTE, _route_names)}.get(response.type_url)
        if follow is not None:
            type_url, names_of = follow
            names = names_of(response)
            if names != subscribed.get(type_url):
                subscribed[type_url] = names
                outbox.put_nowait(discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, resource_names=names))


def _channel(xds: str, pki: str | None) -> grpc.aio.Channel:
    if pki is None:
        return grpc.aio.insecure_channel(xds)
    from control_plane.internal_pki import channel_credentials

    return grpc.aio.secure_channel(xds, channel_credentials(pki, "envoy", IDENTITY),
                                   options=[("grpc.ssl_target_name_override", "localhost")])


async def run(xds: str, streams: int, seconds: float, out: str, pki: str | None = None) -> None:
    records: list = []
    channels = [_channel(xds, pki) for _ in range(-(-streams // STREAMS_PER_CHANNEL))]
    tasks = [asyncio.create_task(one_stream(channels[i // STREAMS_PER_CHANNEL], i, records)) for i in range(streams)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with open(out, "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    for channel in channels:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xds", required=True, help="host:port of the ADS server")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pki", help="internal_tls folder: mutual TLS with its envoy-bench-envoy certificate")
    args = parser.parse_args()
    asyncio.run(run(args.xds, args.streams, args.seconds, args.out, args.pki))


if __name__ == "__main__":
    main()
