"""The access-log service every Envoy streams to: each try at an engine and each request, as they happen.

Envoy's router logs a try when its stream to the engine starts (UpstreamPoolReady) and when it
ends (UpstreamEnd); the connection manager logs each request once, at its end (DownstreamEnd).
Each entry carries the model and the upload's audio-seconds that the Lua filter set as headers
(control_plane/builders/listener.py lists them). Starts and ends feed the ledger of work in
flight, ends the failure ratios, requests the metering. Nothing here is in a request's path:
Envoy sends the logs in batches, and a control plane that is down loses only evidence.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes, failed

log = logging.getLogger(__name__)

MODEL_HEADER = "x-whisper-model"
SECONDS_HEADER = "x-whisper-audio-seconds"
ESTIMATED_HEADER = "x-whisper-audio-estimated"
TRY_STARTED = accesslog_pb2.AccessLogType.UpstreamPoolReady
TRY_ENDED = accesslog_pb2.AccessLogType.UpstreamEnd
REQUEST_ENDED = accesslog_pb2.AccessLogType.DownstreamEnd


def audio_seconds(entry: accesslog_pb2.HTTPAccessLogEntry) -> float | None:
    """The upload's audio-seconds as the filter measured them; None for requests it did not route."""
    try:
        seconds = float(entry.request.request_headers.get(SECONDS_HEADER, ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds < 10**7 else None


def endpoint_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
    address = entry.common_properties.upstream_remote_address.socket_address
    return f"{address.address}:{address.port_value}" if address.address else None


def record(entry: accesslog_pb2.HTTPAccessLogEntry, stream: int, outcomes: Outcomes, ledger: Ledger,
           now: float) -> None:
    """One log entry into the failure ratios, the ledger or the metering, by what it reports."""
    kind, seconds = entry.common_properties.access_log_type, audio_seconds(entry)
    if kind == REQUEST_ENDED:
        model = entry.request.request_headers.get(MODEL_HEADER)
        if model and seconds is not None:
            status = entry.response.response_code.value
            ledger.meter(model, seconds, ESTIMATED_HEADER in entry.request.request_headers, 200 <= status < 300)
        return
    endpoint = endpoint_of(entry)
    if endpoint is None:
        return
    if kind == TRY_STARTED:
        if seconds is not None:
            ledger.started(stream, entry.request.request_id, endpoint, seconds, now)
    elif kind == TRY_ENDED:
        ok = not failed(entry)
        outcomes.record(endpoint, ok, now)
        ledger.ended(stream, entry.request.request_id, endpoint, ok and entry.response.response_code.value < 400,
                     now)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Receives every Envoy's logs; each stream is one Envoy's, so its tries go when it does."""

    def __init__(self, outcomes: Outcomes, ledger: Ledger, clock: Callable[[], float]):
        self.outcomes, self.ledger, self.clock = outcomes, ledger, clock
        self._streams = itertools.count(1)

    async def StreamAccessLogs(self, request_iterator, context: grpc.aio.ServicerContext):
        stream = next(self._streams)
        try:
            async for message in request_iterator:
                now = self.clock()
                for entry in message.http_logs.log_entry:
                    record(entry, stream, self.outcomes, self.ledger, now)
        finally:
            self.ledger.stream_closed(stream, self.clock())
        return als_pb2.StreamAccessLogsResponse()
