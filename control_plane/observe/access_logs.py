"""The access-log service every Envoy streams to: each try at an engine, and each failed request.
They feed the ledger, the failure ratios, the metering, and the requests in flight per key and
batch lane (observe/in_flight.py).

Envoy's router logs a try when its stream to the engine starts (UpstreamPoolReady) and when it
ends (UpstreamEnd); the connection manager logs a request at its end (DownstreamEnd) only when
the Lua filter routed it and it did not end in a 2xx. A try's entry carries the model and the
upload's audio-seconds as the headers the Lua filter set on the request it routed (a client's
own are removed first, and only routed requests reach an engine); a request's entry carries
them as the filter's dynamic metadata, which a client cannot forge, so a request the filter did
not route (a refusal, `/health`) is never metered. Starts and ends feed the ledger of work in
flight, ends the failure ratios; a try's 2xx end that was not cut short meters its request as
served (the client got that answer, so no other try of it can have been), a request's entry as
failed (or refused, for the gateway's own 429s)
(control_plane/builders/listener.py sets the logs up). Nothing here is in a request's path:
Envoy sends the logs in batches, and a control plane that is down loses only evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from grpc_health.v1 import health

from control_plane.names import (AUDIO_ESTIMATED_HEADER, AUDIO_SECONDS_HEADER, AUDIO_SECONDS_LIMIT, REQUESTS_LIMIT, BATCH_LANE_HEADER, CUT_SHORT_FLAGS,
                                 BATCH_LANE_KEY, CLAIMED_KEY, ENGINE_SECONDS_KEY, ESTIMATED_KEY, IN_FLIGHT_LIMIT, KEY_ID_HEADER, KEY_ID_KEY, LONGFORM_HEADER, PIECE_HEADER,
                                 LIMITED_HEADER, LUA_REPLY_KEY, METADATA_NAMESPACE, MODEL_HEADER, MODEL_KEY,
                                 SECONDS_KEY, STREAMED_KEY)
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import UNKNOWN_MODEL, Ledger
from control_plane.observe.outcomes import Outcomes, failed, route_timed_out

TRY_STARTED = accesslog_pb2.AccessLogType.UpstreamPoolReady
TRY_ENDED = accesslog_pb2.AccessLogType.UpstreamEnd
REQUEST_ENDED = accesslog_pb2.AccessLogType.DownstreamEnd


def as_seconds(text: str) -> float | None:
    """A non-negative, finite number of seconds, or None."""
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def endpoint_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
    """"ip:port", or a Unix socket's path (the longform workers')."""
    upstream = entry.common_properties.upstream_remote_address
    if upstream.pipe.path:
        return upstream.pipe.path
    address = upstream.socket_address
    return f"{address.address}:{address.port_value}" if address.address else None


def answered(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
    return 200 <= entry.response.response_code.value < 300


def delivered(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
    """A 2xx not cut short by the engine (or the way to it): flags that only the request's entry
    can carry (a route timeout, the client's idle stream) do not count, or the request would be
    metered twice, served from its try and failed from its own log."""
    flags = entry.common_properties.response_flags
    return answered(entry) and not any(getattr(flags, name) for name in CUT_SHORT_FLAGS)


def day_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """The UTC day its Envoy started the request (what a bill counts it in)."""
    return entry.common_properties.start_time.ToDatetime().date().isoformat()


def try_time(entry: accesslog_pb2.HTTPAccessLogEntry) -> float | None:
    """Seconds from a try's last byte sent to the engine to its answer's last byte, or None."""
    common = entry.common_properties
    if not (common.HasField("time_to_last_upstream_tx_byte") and common.HasField("time_to_last_upstream_rx_byte")):
        return None
    taken = (common.time_to_last_upstream_rx_byte.ToTimedelta()
             - common.time_to_last_upstream_tx_byte.ToTimedelta()).total_seconds()
    return taken if taken >= 0 else None


def _string(fields, name: str) -> str:
    """A string the Lua filter set as dynamic metadata (`fields`: its namespace's, or None), or ""."""
    return fields.fields[name].string_value if fields is not None and name in fields.fields else ""


@dataclass(frozen=True)
class Known:
    """What a log entry may speak of, as last published: even an Envoy that proved who it is
    cannot make a model, a key, a batch lane or an engine out of thin air (each would become
    state and metric labels), nor report more audio-seconds than one upload may count as.
    None: anything (tests of the counting alone)."""

    models: frozenset[str] | None = None
    keys: frozenset[str] | None = None  # key ids; "" (no key) is always known
    lanes: frozenset[str] | None = None
    endpoints: frozenset[str] | None = None
    max_audio_s: float = math.inf

    def problem(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
        """Why the entry is not taken, or None."""
        headers = entry.request.request_headers
        fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
        checks = ((self.models, headers.get(MODEL_HEADER, "") or _string(fields, MODEL_KEY), "unknown model"),
                  (self.keys, headers.get(KEY_ID_HEADER, "") or _string(fields, KEY_ID_KEY), "unknown key"),
                  (self.lanes, headers.get(BATCH_LANE_HEADER, "") or _string(fields, BATCH_LANE_KEY),
                   "unknown batch lane"),
                  (self.endpoints, endpoint_of(entry) or "", "endpoint outside the fleet"))
        for allowed, value, why in checks:
            if value and allowed is not None and value not in allowed:
                return why
        return None

    def clamp(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
        """Caps the entry's audio-seconds, wherever it carries them, at max_audio_s (one upload
        counts as no more); True when it claimed more."""
        value, clamped = repr(self.max_audio_s), False
        headers = entry.request.request_headers
        if (seconds := as_seconds(headers.get(AUDIO_SECONDS_HEADER, ""))) is not None and seconds > self.max_audio_s:
            headers[AUDIO_SECONDS_HEADER], clamped = value, True
        fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
        for key in (SECONDS_KEY, ENGINE_SECONDS_KEY):
            if fields is not None and key in fields.fields:
                seconds = as_seconds(fields.fields[key].string_value)
                if seconds is not None and seconds > self.max_audio_s:
                    fields.fields[key].string_value, clamped = value, True
        return clamped


def _meter_failed(entry: accesslog_pb2.HTTPAccessLogEntry, ledger: Ledger) -> None:
    fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if fields is None or MODEL_KEY not in fields.fields or delivered(entry):
        return  # not a request the filter routed, or one its try's end metered
    seconds = as_seconds(fields.fields[SECONDS_KEY].string_value) if SECONDS_KEY in fields.fields else None
    if seconds is not None:
        key = _string(fields, KEY_ID_KEY)
        ledger.meter(fields.fields[MODEL_KEY].string_value, seconds, ESTIMATED_KEY in fields.fields,
                     "refused" if refused_here(entry, fields) else "failed", key, day_of(entry))


# The response details of a 429 from the requests-in-flight filter (Envoy's rate_limit_quota).
IN_FLIGHT_REFUSAL = "rate_limited_by_quota"


def refused_here(entry: accesslog_pb2.HTTPAccessLogEntry, fields) -> bool:
    """A 429 of the gateway's own (a quota filter's, the requests-in-flight limit's, or the Lua
    filter's lane or upload-size answer), not an engine's."""
    own = (entry.common_properties.response_flags.rate_limited or LUA_REPLY_KEY in fields.fields
           or entry.response.response_code_details == IN_FLIGHT_REFUSAL)
    return entry.response.response_code.value == 429 and own


def _meter_served(entry: accesslog_pb2.HTTPAccessLogEntry, ledger: Ledger, billed: bool = True, timed: bool = True) -> None:
    """A whole answer: its request served (`billed`: not a recording's piece), and the time its try
    took (`timed`: an engine's try, not a whole recording's at a worker): a model's speed."""
    headers = entry.request.request_headers
    seconds = as_seconds(headers.get(AUDIO_SECONDS_HEADER, ""))
    if seconds is not None and headers.get(MODEL_HEADER):
        if billed:
            ledger.meter(headers[MODEL_HEADER], seconds, AUDIO_ESTIMATED_HEADER in headers, "served",
                         headers.get(KEY_ID_HEADER, ""), day_of(entry))
        if timed and (taken := try_time(entry)) is not None:
            ledger.took(headers[MODEL_HEADER], seconds, taken)


@dataclass(frozen=True)
class Mismatch:
    """A served request whose container lied, or whose engine measured its audio otherwise than
    the edge: the edge's audio-seconds and the engine's figure, where the answer carried one."""

    model: str
    key: str
    edge: float | None
    engine: float | None
    day: str


def mismatch(entry: accesslog_pb2.HTTPAccessLogEntry) -> Mismatch | None:
    """A 2xx request's entry that the Lua filter logged as a mismatch (its try's end metered it),
    or None for any other entry."""
    fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if entry.common_properties.access_log_type != REQUEST_ENDED or not delivered(entry) \
            or not (_string(fields, ENGINE_SECONDS_KEY) or _string(fields, CLAIMED_KEY)):
        return None
    return Mismatch(_string(fields, MODEL_KEY), _string(fields, KEY_ID_KEY), as_seconds(_string(fields, SECONDS_KEY)),
                    as_seconds(_string(fields, ENGINE_SECONDS_KEY)), day_of(entry))


@dataclass(frozen=True)
class Streamed:
    """A recording streamed to its worker unread (envoy/longform.lua), served: its model and
    length, which only its answer knew (its worker's, bounded by the Lua filter), and its key."""

    model: str
    seconds: float
    key: str


def streamed(entry: accesslog_pb2.HTTPAccessLogEntry) -> Streamed | None:
    """A served streamed recording's request entry (metered from it, not from its try's end, whose
    request named no model), or None for any other entry."""
    fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if entry.common_properties.access_log_type != REQUEST_ENDED or not delivered(entry) \
            or not _string(fields, STREAMED_KEY) or not _string(fields, MODEL_KEY):
        return None
    seconds = as_seconds(_string(fields, SECONDS_KEY))
    return None if seconds is None else Streamed(_string(fields, MODEL_KEY), seconds, _string(fields, KEY_ID_KEY))


def cost(seconds: float) -> int:
    """What an upload of `seconds` is charged to a key's budget: whole audio-seconds, at least one
    (as the Lua filter charges it)."""
    return max(1, math.ceil(seconds))


def record(entry: accesslog_pb2.HTTPAccessLogEntry, stream: int, outcomes: Outcomes, ledger: Ledger,
           in_flight: InFlight, now: float) -> bool:
    """One log entry into the failure ratios, the ledger, the metering or the requests in flight
    (per key and batch lane), by what it reports; True when a count of requests in flight changed."""
    kind = entry.common_properties.access_log_type
    request_id = entry.request.request_id
    if kind == REQUEST_ENDED:
        if route_timed_out(entry) and (endpoint := endpoint_of(entry)) is not None:
            outcomes.record(endpoint, False, now)  # its last try's entry said nothing
        if (found := mismatch(entry)) is not None:  # metered at its try's end: corrected to the engine's figure
            if found.model and found.edge is not None:
                ledger.correct(found.model, found.edge, found.engine, found.key, found.day)
            return False
        if (recording := streamed(entry)) is not None:  # its try's end, like a 2xx's, ended it in flight
            ledger.meter(recording.model, recording.seconds, False, "served", recording.key, day_of(entry))
            return False
        _meter_failed(entry, ledger)
        return _request_ended(entry, in_flight, now)
    endpoint = endpoint_of(entry)
    if endpoint is None:
        return False
    headers = entry.request.request_headers
    # A recording at a longform worker is no engine's work (its pieces are, and are not metered:
    # the recording is, once).
    recording, piece = LONGFORM_HEADER in headers, PIECE_HEADER in headers
    if kind == TRY_STARTED:
        seconds = as_seconds(headers.get(AUDIO_SECONDS_HEADER, ""))
        if recording:
            ledger.recording_started(stream, request_id, headers.get(MODEL_HEADER) or UNKNOWN_MODEL, now)
        elif seconds is not None:
            ledger.started(stream, request_id, endpoint, seconds, now, piece=piece)
        return in_flight.started((headers.get(KEY_ID_HEADER, ""), headers.get(BATCH_LANE_HEADER, "")), request_id,
                                 stream, endpoint, now)
    if kind == TRY_ENDED:
        verdict = failed(entry)  # None: Envoy ended it (a hedge's loser, a client gone): no evidence
        if recording:
            ledger.recording_ended(stream, request_id)
        else:
            if verdict is not None:
                outcomes.record(endpoint, not verdict, now)
            ledger.ended(stream, request_id, endpoint, verdict is False and entry.response.response_code.value < 400, now)
        answered = delivered(entry)
        if answered:
            _meter_served(entry, ledger, billed=not piece, timed=not recording)
        return in_flight.try_ended(request_id, endpoint, answered, now)
    return False


def arrival(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, float, bool] | None:
    """A keyed request's arrival at its Envoy, for the budgets across Envoys (observe/admissions.py):
    (key id, its cost in whole audio-seconds, admitted) for a try's start (admitted) or a request
    a per-minute quota filter refused; None for any other entry."""
    kind = entry.common_properties.access_log_type
    if kind == TRY_STARTED:
        headers = entry.request.request_headers
        key, seconds = headers.get(KEY_ID_HEADER, ""), as_seconds(headers.get(AUDIO_SECONDS_HEADER, ""))
        admitted = True
    elif kind == REQUEST_ENDED and entry.response.response_headers.get(LIMITED_HEADER) in (REQUESTS_LIMIT,
                                                                                          AUDIO_SECONDS_LIMIT):
        fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
        key, seconds = _string(fields, KEY_ID_KEY), as_seconds(_string(fields, SECONDS_KEY))
        admitted = False
    else:
        return None
    return (key, cost(seconds), admitted) if key and seconds is not None else None


def charged_after(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, float] | None:
    """A mismatch whose engine measured more audio than the edge charged, or a streamed recording
    (charged one audio-second at its headers): (key id, the whole audio-seconds more), which the
    key's budget is charged after the fact; else None."""
    if (recording := streamed(entry)) is not None:
        more = cost(recording.seconds) - cost(0.0)
        return (recording.key, more) if recording.key and more > 0 else None
    found = mismatch(entry)
    if found is None or not found.key or found.edge is None or found.engine is None:
        return None
    more = math.ceil(found.engine) - cost(found.edge)
    return (found.key, more) if more > 0 else None


def _request_ended(entry: accesslog_pb2.HTTPAccessLogEntry, in_flight: InFlight, now: float) -> bool:
    """A routed request that did not end in a 2xx, into the requests in flight. One the in-flight
    filters refused took no token of the refusing filter's group, nor of the groups of the filters
    after it (the batch lane's filter comes first: builders/quotas.py); one the Lua filter answered
    took none at all."""
    fields = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    key, lane = _string(fields, KEY_ID_KEY), _string(fields, BATCH_LANE_KEY)
    if fields is not None and LUA_REPLY_KEY in fields.fields:
        groups = ()  # the Lua filter's own answer (a closed lane, an upload too long): before every quota filter
    elif entry.response.response_code_details == IN_FLIGHT_REFUSAL:
        limited = entry.response.response_headers.get(LIMITED_HEADER)
        groups = (lane,) if limited == IN_FLIGHT_LIMIT else ()
    else:
        groups = (key, lane)
    return in_flight.ended(entry.request.request_id, groups, now, tried=endpoint_of(entry) is not None)


async def _as_it_says(context: grpc.aio.ServicerContext, node_id: str | None = None) -> str:
    """Every peer taken as it says (tests of the counting alone)."""
    return context.peer()


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Receives every Envoy's logs. Envoy opens a stream per worker thread and log; a try's start
    and end come on the same one, so when a stream ends its open tries go with it."""

    def __init__(self, outcomes: Outcomes, ledger: Ledger, in_flight: InFlight, clock: Callable[[], float],
                 in_flight_changed: Callable[[], None], known: Callable[[], Known] = Known,
                 dropped: Callable[[str, str], None] = lambda reason, peer: None,
                 authorize: Callable[[grpc.aio.ServicerContext, str | None], Awaitable[str]] = None,
                 arrived: Callable[[str, str, str, float, bool, float], None] = lambda *arrival: None,
                 charged: Callable[[str, float, float], None] = lambda *charge: None):
        # (context, node id) -> the peer's label, or the stream is aborted (control_plane/peers.py)
        self.authorize = authorize or _as_it_says
        self.outcomes, self.ledger, self.in_flight, self.clock = outcomes, ledger, in_flight, clock
        self.in_flight_changed = in_flight_changed  # after a batch of entries that moved a count
        self.known = known  # what entries may speak of, now
        self.dropped = dropped  # (reason, peer) of each entry not taken, or clamped
        # (request id, key id, Envoy's node id, cost, admitted, now) of each keyed request's arrival
        self.arrived = arrived
        self.charged = charged  # (key id, audio-seconds, now) the engine's figure added to a request's cost
        self._streams = itertools.count(1)
        # A stopping plane (drain()): health checks answered NOT_SERVING (draining), then, once
        # every Envoy has seen that, each stream ends after its next message (ending).
        self.draining, self.ending, self.open_streams, self._ended = False, False, 0, asyncio.Event()
        # grpc.health.v1, which Envoy's xds_cluster checks (envoy/bootstrap.yaml): SERVING until
        # drain(). An Envoy told NOT_SERVING starts no log stream here: its workers keep their
        # entries for the plane that comes back.
        self.health = health.aio.HealthServicer()

    def take(self, entries, stream: int, peer: str, node: str = "") -> None:
        """One message's entries from Envoy `node`, each checked against what is known first."""
        now, known, changed = self.clock(), self.known(), False
        for entry in entries:
            if why := known.problem(entry):
                self.dropped(why, peer)
                continue
            if known.clamp(entry):
                self.dropped("audio-seconds over limits.max_audio_s", peer)
            changed = record(entry, stream, self.outcomes, self.ledger, self.in_flight, now) or changed
            if (came := arrival(entry)) is not None:
                self.arrived(entry.request.request_id, came[0], node, came[1], came[2], now)
            elif (more := charged_after(entry)) is not None:
                self.charged(more[0], more[1], now)
        if changed:
            self.in_flight_changed()

    async def drain(self, timeout: float, noticed_s: float = 0.0) -> None:
        """Answers health checks NOT_SERVING, reads on as before for `noticed_s` while every Envoy
        asks, then waits until every stream has ended after its next message (or `timeout`):
        Envoy sends a worker's entries once per flush interval, and what it logs after that
        message waits in Envoy, which no longer starts a stream here. Ending a stream before its
        Envoy saw NOT_SERVING lost a batch: the worker's next flush started a new stream here."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(noticed_s)
        self.ending = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self.open_streams and (left := deadline - asyncio.get_running_loop().time()) > 0:
            self._ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), left)

    async def StreamAccessLogs(self, request_iterator, context: grpc.aio.ServicerContext):
        # A stream that starts while the plane drains is read all the same: its Envoy sent its
        # first batch with it, and has no other copy of those entries.
        peer = await self.authorize(context, None)
        await context.send_initial_metadata(())  # Envoy stops holding what it sent for a retry
        stream = next(self._streams)
        first, node = True, ""
        self.open_streams += 1
        try:
            async for message in request_iterator:
                if first:  # the first message names the node: it must be the certificate's
                    node = message.identifier.node.id
                    peer = await self.authorize(context, node)
                first = False
                self.take(message.http_logs.log_entry, stream, peer, node)
                if self.ending:
                    break
        finally:
            self.open_streams -= 1
            self._ended.set()
            self.ledger.stream_closed(stream, self.clock())
            if self.in_flight.stream_closed(stream):
                self.in_flight_changed()
        return als_pb2.StreamAccessLogsResponse()
