"""A stopping control plane's access-log streams, against scripted Envoy workers (no sockets):
nothing an Envoy sent is left unread. ALS has no acknowledgement, so a batch in a stream the
plane ends or refuses unread is gone; a batch Envoy could not send (the plane unhealthy) waits
in Envoy for the plane that comes back (envoy/bootstrap.yaml)."""

from __future__ import annotations

import asyncio
import time

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from grpc_health.v1 import health_pb2

from control_plane.names import AUDIO_SECONDS_HEADER, KEY_ID_HEADER, MODEL_HEADER
from control_plane.observe.access_logs import AccessLogServicer
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes

MODEL, KEY = "m1", "key-1"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def batch(requests: int) -> als_pb2.StreamAccessLogsMessage:
    """One flush of an Envoy worker: `requests` 1 s clips served."""
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.node.id = "envoy"
    for n in range(requests):
        entry = message.http_logs.log_entry.add()
        entry.common_properties.access_log_type = accesslog_pb2.AccessLogType.UpstreamEnd
        entry.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
        entry.common_properties.upstream_remote_address.socket_address.port_value = 9
        entry.request.request_id = f"r-{time.monotonic_ns()}-{n}"
        entry.request.request_headers.update({MODEL_HEADER: MODEL, AUDIO_SECONDS_HEADER: "1", KEY_ID_HEADER: KEY})
        entry.response.response_code.value = 200
    return message


class Context:
    def __init__(self) -> None:
        self.aborted = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def send_initial_metadata(self, metadata) -> None:
        pass

    async def abort(self, code, details) -> None:
        self.aborted = code
        raise asyncio.CancelledError(details)


class Worker:
    """One Envoy worker's log stream."""

    def __init__(self, plane: AccessLogServicer):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.context = Context()
        self.call = asyncio.ensure_future(plane.StreamAccessLogs(self._messages(), self.context))

    async def _messages(self):
        while True:
            message = await self.queue.get()
            yield message
            self.queue.task_done()  # the plane asks for the next one: it took this one

    async def send(self, requests: int) -> None:
        """Sends a batch, and returns once the plane took it, or ended the stream."""
        await self.queue.put(batch(requests))
        taken = asyncio.ensure_future(self.queue.join())
        await asyncio.wait([taken, self.call], return_when=asyncio.FIRST_COMPLETED)
        taken.cancel()

    def ended(self) -> bool:
        return self.call.done()


def served(ledger: Ledger) -> float:
    return ledger.usage_of(KEY).get(MODEL, {}).get("audio_served_s", 0.0)


async def health(plane: AccessLogServicer) -> int:
    return (await plane.health.Check(health_pb2.HealthCheckRequest(), Context())).status


def test_a_stopping_plane_reads_every_batch_sent_until_its_streams_end():
    async def scenario() -> None:
        ledger = Ledger()
        plane = AccessLogServicer(Outcomes(), ledger, InFlight(), time.monotonic, lambda: None)
        first = Worker(plane)
        await first.send(3)
        # Draining, while the Envoys have not all asked their health checks yet: every stream is
        # read as before, and one that starts now (its worker still sees the plane healthy) too.
        noticing = asyncio.ensure_future(plane.drain(timeout=60, noticed_s=3600))
        while not plane.draining:
            await asyncio.sleep(0)
        assert await health(plane) == NOT_SERVING
        await first.send(4)
        second = Worker(plane)
        await second.send(5)
        assert served(ledger) == 12.0 and not first.ended() and not second.ended()
        assert first.context.aborted is None and second.context.aborted is None
        noticing.cancel()
        # Every Envoy saw NOT_SERVING: each stream ends after its next batch, which is read.
        ending = asyncio.ensure_future(plane.drain(timeout=60, noticed_s=0))
        while not plane.ending:
            await asyncio.sleep(0)
        await first.send(6)
        await second.send(7)
        assert first.ended() and second.ended()
        await ending
        # A worker that starts a stream all the same (its Envoy slow to notice) loses nothing either.
        late = Worker(plane)
        await late.send(8)
        assert late.ended() and late.context.aborted is None
        assert served(ledger) == 3.0 + 4 + 5 + 6 + 7 + 8

    asyncio.run(scenario())
