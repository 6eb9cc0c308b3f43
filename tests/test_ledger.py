"""The audio-seconds ledger and the access-log entries that feed it, case by case (no I/O)."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from control_plane.config import parse_config
from control_plane.decide.longform import pieces_at_once
from control_plane.observe.access_logs import IN_FLIGHT_REFUSAL, REQUEST_ENDED, TRY_ENDED, TRY_STARTED, record
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import UNKNOWN_MODEL, Ledger
from control_plane.observe.outcomes import Outcomes

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"


def test_work_in_flight_is_what_was_sent_and_not_answered():
    ledger = Ledger()
    ledger.started(1, "r1", E1, 60.0, now=0.0)
    ledger.started(1, "r2", E1, 5.0, now=0.0)
    ledger.started(2, "r1", E2, 60.0, now=0.0)  # a hedge of r1 from another Envoy's stream
    assert (ledger.in_flight(E1), ledger.requests_in_flight(E1)) == (65.0, 3)
    ledger.started(1, "r2", E1, 5.0, now=0.1)  # hedged to the same (only) engine: two tries at once
    assert ledger.in_flight(E1) == 70.0
    ledger.ended(1, "r2", E1, answered=False, now=0.5)  # the loser, cut
    ledger.ended(1, "r1", E1, answered=True, now=2.0)
    assert ledger.in_flight(E1) == 5.0 and ledger.in_flight(E2) == 60.0
    ledger.ended(1, "nobody", E1, answered=True, now=2.0)  # an end without a start changes nothing
    assert ledger.in_flight(E1) == 5.0


def test_audio_per_engine_request_follows_what_was_sent_lately():
    ledger = Ledger()
    assert ledger.audio_per_request(E1) is None
    ledger.started(1, "r1", E1, 4.0, now=0.0)
    ledger.started(1, "r2", E1, 90.0, now=0.0)  # three engine requests of 30 s
    assert ledger.audio_per_request(E1) == pytest.approx(0.8 * 4.0 + 0.2 * 30.0)


def test_speed_is_audio_answered_per_second_of_being_busy():
    ledger = Ledger()
    assert ledger.rate(E1, now=0.0) is None
    ledger.started(1, "r1", E1, 30.0, now=0.0)
    ledger.ended(1, "r1", E1, answered=True, now=2.0)
    ledger.started(1, "r2", E1, 30.0, now=10.0)  # idle from 2 s to 10 s: not counted as busy
    ledger.ended(1, "r2", E1, answered=True, now=12.0)
    assert ledger.rate(E1, now=12.0) == pytest.approx(15.0, rel=0.15)  # decay weighs the two a little apart
    ledger.started(1, "r3", E1, 30.0, now=12.0)
    ledger.ended(1, "r3", E1, answered=False, now=14.0)  # failed: busy, but nothing answered
    assert ledger.rate(E1, now=14.0) < 15.0
    ledger.expire(now=19.0, max_age_s=660.0)  # the load loop's housekeeping is no activity
    assert ledger.rate(E1, now=19.1) is None  # idle for over 5 s: unmeasured again


def test_a_long_try_keeps_its_engines_speed():
    ledger = Ledger()
    ledger.started(1, "r1", E1, 30.0, now=0.0)
    ledger.ended(1, "r1", E1, answered=True, now=2.0)
    ledger.started(1, "r2", E1, 600.0, now=2.0)
    assert ledger.rate(E1, now=30.0) is not None  # 28 s without an answer, but busy all along
    untouched = Ledger()
    untouched.started(1, "r1", E1, 30.0, now=0.0)
    untouched.ended(1, "r1", E1, answered=True, now=2.0)
    untouched.started(1, "r2", E1, 600.0, now=2.0)
    assert ledger.rate(E1, now=31.0) == untouched.rate(E1, now=31.0)  # reading at 30 s changed nothing


def test_an_engine_that_holds_nothing_settles_tries_whose_end_was_lost():
    ledger = Ledger()
    ledger.started(1, "old", E1, 30.0, now=0.0)
    ledger.started(1, "new", E1, 10.0, now=9.0)  # may still be on its way to the engine
    ledger.settle(E1, now=10.0)
    assert ledger.in_flight(E1) == 10.0


def test_tries_of_an_envoy_that_went_away_or_lost_their_end_leave_the_ledger():
    ledger = Ledger()
    ledger.started(1, "r1", E1, 30.0, now=0.0)
    ledger.started(2, "r2", E1, 20.0, now=0.0)
    ledger.stream_closed(1, now=1.0)
    assert ledger.in_flight(E1) == 20.0
    ledger.expire(now=700.0, max_age_s=660.0)
    assert ledger.in_flight(E1) == 0.0
    ledger.retain(set())
    assert ledger.rate(E1, now=700.0) is None


def test_metering_counts_each_request_once_by_outcome():
    ledger = Ledger()
    ledger.meter("m", 7.5, estimated=False, outcome="served")
    ledger.meter("m", 2.0, estimated=True, outcome="failed")
    metered = ledger.metered["m"]
    assert (metered.requests, metered.received, metered.served, metered.failed, metered.estimated, metered.longest) == (
        2, 9.5, 7.5, 2.0, 2.0, 7.5)


def entry(kind, endpoint=E1, status=0, seconds="12.5", model="m", request_id="r1", routed=True,
          reset=False, estimated=False, rate_limited=False, timeout=False, key=None,
          details="") -> accesslog_pb2.HTTPAccessLogEntry:
    """A log entry as Envoy sends it: headers as the request carried them; for a request the Lua
    filter routed, its dynamic metadata."""
    host, port = endpoint.rsplit(":", 1) if endpoint and not endpoint.startswith("/") else ("", "0")
    headers = {"x-whisper-model": model, "x-whisper-audio-seconds": seconds} if seconds is not None else {}
    if estimated:
        headers["x-whisper-audio-estimated"] = "1"
    if key is not None:
        headers["x-whisper-key-id"] = key
    upstream = (address_pb2.Address(pipe=address_pb2.Pipe(path=endpoint)) if endpoint and endpoint.startswith("/")
                else address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=int(port))))
    common = accesslog_pb2.AccessLogCommon(access_log_type=kind, upstream_remote_address=upstream)
    common.response_flags.upstream_remote_reset = reset
    common.response_flags.rate_limited = rate_limited
    common.response_flags.upstream_request_timeout = timeout
    if routed and seconds is not None:
        common.metadata.filter_metadata["whisper_gateway"].update({"model": model, "audio_seconds": seconds}
                                                                  | ({"key_id": key} if key is not None else {}))
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common,
        request=accesslog_pb2.HTTPRequestProperties(request_id=request_id, request_headers=headers),
        response=accesslog_pb2.HTTPResponseProperties(response_code=wrappers_pb2.UInt32Value(value=status),
                                                      response_code_details=details))


ENTRIES = [
    # (what, entries, audio in flight at E1 after, failure evidence (ok, failed), metered (received, served, failed))
    ("a try starts", [entry(TRY_STARTED)], 12.5, (0, 0), None),
    ("an engine's 400 is not the engine failing", [entry(TRY_STARTED), entry(TRY_ENDED, status=400)], 0.0, (1, 0),
     None),
    ("a start without the filter's header is not work we can count", [entry(TRY_STARTED, seconds=None)], 0.0, (0, 0),
     None),
    ("a header that is not a number is ignored", [entry(TRY_STARTED, seconds="twelve")], 0.0, (0, 0), None),
    ("an infinite one too", [entry(TRY_STARTED, seconds="1e999")], 0.0, (0, 0), None),
    ("a try answered: its request is metered as served",
     [entry(TRY_STARTED), entry(TRY_ENDED, status=200)], 0.0, (1, 0), (12.5, 12.5, 0.0)),
    ("a 503 retried and answered: served once", [entry(TRY_STARTED), entry(TRY_ENDED, status=503),
                                                 entry(TRY_STARTED), entry(TRY_ENDED, status=200)],
     0.0, (1, 1), (12.5, 12.5, 0.0)),
    ("an answer cut short by the engine failed", [entry(TRY_STARTED), entry(TRY_ENDED, status=200, reset=True),
                                                  entry(REQUEST_ENDED, endpoint=None, status=200, reset=True)],
     0.0, (0, 1), (12.5, 0.0, 12.5)),
    ("a route timeout after the engine's 200: served, once", [entry(TRY_STARTED), entry(TRY_ENDED, status=200),
                                                             entry(REQUEST_ENDED, endpoint=None, status=200, timeout=True)],
     0.0, (1, 0), (12.5, 12.5, 0.0)),
    ("a quota's 429 is refused, not failed", [entry(REQUEST_ENDED, endpoint=None, status=429, rate_limited=True)],
     0.0, (0, 0), (12.5, 0.0, 0.0)),
    ("the requests-in-flight limit's 429 is refused", [entry(REQUEST_ENDED, endpoint=None, status=429,
                                                             details=IN_FLIGHT_REFUSAL)], 0.0, (0, 0), (12.5, 0.0, 0.0)),
    ("an engine's 429 failed", [entry(TRY_STARTED), entry(TRY_ENDED, status=429),
                                entry(REQUEST_ENDED, endpoint=None, status=429)], 0.0, (1, 0), (12.5, 0.0, 12.5)),
    ("an engine's 400 ends its request failed", [entry(TRY_STARTED), entry(TRY_ENDED, status=400),
                                                 entry(REQUEST_ENDED, endpoint=None, status=400)],
     0.0, (1, 0), (12.5, 0.0, 12.5)),
    ("a request Envoy failed (no engine)", [entry(REQUEST_ENDED, endpoint=None, status=503)], 0.0, (0, 0),
     (12.5, 0.0, 12.5)),
    ("a 2xx request entry is not metered twice", [entry(REQUEST_ENDED, endpoint=None, status=200)], 0.0, (0, 0),
     None),
    ("a request the filter refused, with a client's forged headers: not metered",
     [entry(REQUEST_ENDED, endpoint=None, status=404, seconds="9999999", routed=False)], 0.0, (0, 0), None),
]


@pytest.mark.parametrize("what,entries,in_flight,evidence,metered", ENTRIES, ids=[c[0] for c in ENTRIES])
def test_access_log_entries(what, entries, in_flight, evidence, metered):
    ledger, outcomes = Ledger(), Outcomes()
    for item in entries:
        record(item, 1, outcomes, ledger, InFlight(), now=1.0)
    assert ledger.in_flight(E1) == in_flight
    tally = outcomes._tallies.get(E1)
    assert ((round(tally.ok), round(tally.failed)) if tally else (0, 0)) == evidence
    got = ledger.metered.get("m")
    assert ((got.received, got.served, got.failed) if got else None) == metered


def test_an_estimated_duration_is_metered_as_estimated_whichever_log_meters_it():
    ledger, outcomes = Ledger(), Outcomes()
    record(entry(TRY_ENDED, status=200, estimated=True), 1, outcomes, ledger, InFlight(), now=1.0)
    record(entry(TRY_ENDED, status=200, seconds="3", request_id="r2"), 1, outcomes, ledger, InFlight(), now=1.0)
    failed_request = entry(REQUEST_ENDED, endpoint=None, status=504, seconds="4")
    failed_request.common_properties.metadata.filter_metadata["whisper_gateway"].update({"audio_estimated": "1"})
    record(failed_request, 1, outcomes, ledger, InFlight(), now=1.0)
    metered = ledger.metered["m"]
    assert (metered.requests, metered.received, metered.estimated) == (3, 19.5, 16.5)


def timed(status, sent_s, answered_s, reset=False, seconds="12.5"):
    """A try's end with the upstream timings Envoy logs (from the try's start)."""
    logged = entry(TRY_ENDED, status=status, reset=reset, seconds=seconds)
    logged.common_properties.time_to_last_upstream_tx_byte.FromMilliseconds(int(sent_s * 1000))
    logged.common_properties.time_to_last_upstream_rx_byte.FromMilliseconds(int(answered_s * 1000))
    return logged


def test_a_whole_answer_is_evidence_of_its_models_speed_and_nothing_else_is():
    ledger = Ledger()
    for logged in (timed(200, 0.5, 3.0), timed(503, 0.0, 1.0), timed(200, 0.0, 9.0, reset=True),
                   entry(TRY_ENDED, status=200)):  # no timings: not evidence
        record(logged, 1, Outcomes(), ledger, InFlight(), now=1.0)
    assert list(ledger.answered["m"]) == [(12.5, 2.5)]  # from the upload's last byte to the answer's


def served_request(edge="60.0", engine=None, status=200, key=None):
    """A served request's own log, sent only when its engine measured the audio otherwise."""
    logged = entry(REQUEST_ENDED, status=status, seconds=edge, key=key)
    if engine is not None:
        logged.common_properties.metadata.filter_metadata["whisper_gateway"].update({"audio_engine_seconds": engine})
    return logged


def test_the_engines_own_figure_corrects_what_the_edge_metered_and_shows_as_corrected():
    ledger, in_flight = Ledger(), InFlight()
    record(entry(TRY_ENDED, status=200, seconds="1.0", key="k"), 1, Outcomes(), ledger, in_flight, now=1.0)
    assert record(served_request(edge="1.0", engine="60", key="k"), 1, Outcomes(), ledger, in_flight, now=1.0) is False
    metered = ledger.metered["m"]
    assert (metered.requests, metered.received, metered.served, metered.corrected, metered.mismatches) == (
        1, 60.0, 60.0, 59.0, 1)
    assert ledger.usage_of("k")["m"]["audio_served_s"] == 60.0 and ledger.usage_of("k")["m"]["mismatches"] == 1
    record(served_request(edge="1.0", engine=None), 1, Outcomes(), ledger, in_flight, now=1.0)  # no figure: nothing
    assert ledger.metered["m"].served == 60.0


def test_a_container_that_lied_is_a_mismatch_even_where_the_edge_measured_its_data_right():
    ledger = Ledger()
    logged = served_request(edge="61.0", key="k")
    logged.common_properties.metadata.filter_metadata["whisper_gateway"].update({"audio_claimed": "1.000"})
    record(entry(TRY_ENDED, status=200, seconds="61.0", key="k"), 1, Outcomes(), ledger, InFlight(), now=1.0)
    record(logged, 1, Outcomes(), ledger, InFlight(), now=1.0)
    metered = ledger.metered["m"]
    assert (metered.served, metered.corrected, metered.mismatches) == (61.0, 0.0, 1)


def test_an_absurd_engine_figure_from_an_authenticated_envoy_counts_as_one_uploads_most():
    from control_plane.observe.access_logs import Known

    logged = served_request(edge="1.000", engine="1e12")
    known = Known(max_audio_s=14400.0)
    assert known.problem(logged) is None and known.clamp(logged) is True  # counted as dropped-or-clamped
    ledger = Ledger()
    record(entry(TRY_ENDED, status=200, seconds="1.000"), 1, Outcomes(), ledger, InFlight(), now=1.0)
    record(logged, 1, Outcomes(), ledger, InFlight(), now=1.0)
    assert ledger.metered["m"].served == 14400.0


def marked(logged: accesslog_pb2.HTTPAccessLogEntry, header: str) -> accesslog_pb2.HTTPAccessLogEntry:
    logged.request.request_headers[header] = "1"
    return logged


WORKER = "/tmp/whisper-gateway/worker-0.sock"  # a Unix socket: as Envoy's logs name a pipe upstream


def test_a_split_recording_is_metered_once_and_its_pieces_count_as_engine_work():
    """A recording at a longform worker (x-whisper-longform) is the key's, metered once when it is
    answered, and no engine's work; each piece (x-whisper-piece) is its engine's work and speed,
    metered never."""
    ledger, outcomes = Ledger(), Outcomes()
    recording = dict(endpoint=WORKER, seconds="70.0", key="key-a", request_id="rec")
    record(marked(entry(TRY_STARTED, **recording), "x-whisper-longform"), 1, outcomes, ledger, InFlight(), now=1.0)
    assert ledger.in_flight(WORKER) == 0.0  # a worker is no engine
    pieces = [("p1", "29.5"), ("p2", "29.5"), ("p3", "11.0")]
    for request_id, seconds in pieces:
        record(marked(entry(TRY_STARTED, seconds=seconds, request_id=request_id), "x-whisper-piece"), 1, outcomes, ledger,
               InFlight(), now=1.0)
    assert ledger.in_flight(E1) == 70.0  # what the engine holds, as any request's
    for request_id, seconds in pieces:
        piece = timed(200, 0.1, 2.0, seconds=seconds)
        piece.request.request_id = request_id
        record(marked(piece, "x-whisper-piece"), 1, outcomes, ledger, InFlight(), now=1.0)
    assert ledger.in_flight(E1) == 0.0
    assert "m" not in ledger.metered  # no piece is metered
    assert len(ledger.answered["m"]) == 3  # each is evidence of the engines' speed
    answered = timed(200, 0.5, 10.0, seconds="70.0")
    answered.request.request_id = "rec"
    answered.common_properties.upstream_remote_address.CopyFrom(address_pb2.Address(pipe=address_pb2.Pipe(path=WORKER)))
    answered.request.request_headers["x-whisper-key-id"] = "key-a"
    record(marked(answered, "x-whisper-longform"), 1, outcomes, ledger, InFlight(), now=1.0)
    metered = ledger.metered["m"]
    assert (metered.requests, metered.received, metered.served) == (1, 70.0, 70.0)
    assert ledger.usage_of("key-a")  # billed to its key
    assert len(ledger.answered["m"]) == 3  # a whole recording's time is not an engine's speed
    assert WORKER not in outcomes._tallies  # nor is the worker judged as an engine


def streamed_recording(status: int, model: str | None = "m", seconds: str = "200.0") -> accesslog_pb2.HTTPAccessLogEntry:
    """A recording streamed to its worker unread: its request's log, with what its answer said."""
    logged = entry(REQUEST_ENDED, endpoint=None, status=status, seconds="0.000", key="key-a", request_id="big")
    fields = logged.common_properties.metadata.filter_metadata["whisper_gateway"]
    del fields["model"]
    fields.update({"streamed": "1", "longform": "1"} | ({"model": model, "audio_seconds": seconds} if model else {}))
    return logged


def test_a_streamed_recording_is_metered_once_from_its_request_log_by_what_its_answer_said():
    ledger, outcomes, in_flight = Ledger(), Outcomes(), InFlight()
    # Its try at the worker named no model: neither metered nor timed there.
    started = marked(entry(TRY_STARTED, endpoint=WORKER, seconds="0.000", model="", key="key-a", request_id="big"),
                     "x-whisper-longform")
    del started.request.request_headers["x-whisper-model"]
    record(started, 1, outcomes, ledger, in_flight, now=1.0)
    assert ledger.recordings_at() == {UNKNOWN_MODEL: 1}  # at its worker: a recording of every model (decide/longform.py)
    ended = marked(entry(TRY_ENDED, endpoint=WORKER, status=200, seconds="0.000", key="key-a", request_id="big"),
                   "x-whisper-longform")
    del ended.request.request_headers["x-whisper-model"]
    record(ended, 1, outcomes, ledger, in_flight, now=2.0)
    assert ledger.metered == {} and ledger.recordings_at() == {}
    assert record(streamed_recording(200), 1, outcomes, ledger, in_flight, now=2.0) is False
    metered = ledger.metered["m"]
    assert (metered.requests, metered.received, metered.served, metered.mismatches) == (1, 200.0, 200.0, 0)
    assert ledger.usage_of("key-a")["m"]["audio_served_s"] == 200.0
    # Refused by its worker's admission (no model learned), or failed before its answer said one: nothing.
    record(streamed_recording(404, model=None), 1, outcomes, ledger, in_flight, now=3.0)
    assert ledger.metered["m"].requests == 1 and set(ledger.metered) == {"m"}
    # Failed after its worker said its length (a stream cut late): metered as failed, as any recording.
    record(streamed_recording(200, seconds="90.0"), 1, outcomes, ledger, in_flight, now=3.0)
    cut = streamed_recording(200, seconds="50.0")
    cut.common_properties.response_flags.upstream_remote_reset = True
    record(cut, 1, outcomes, ledger, in_flight, now=3.0)
    assert (ledger.metered["m"].served, ledger.metered["m"].failed) == (290.0, 50.0)


def test_an_envoy_flooding_made_up_tries_cannot_grow_the_ledger_without_bound(monkeypatch):
    """What an authenticated Envoy reports is still bounded: past MOST_TRIES open at one engine, a
    new try is not counted."""
    monkeypatch.setattr("control_plane.observe.ledger.MOST_TRIES", 100)
    ledger = Ledger()
    for n in range(1000):
        ledger.started(1, f"fake-{n}", E1, 1e6, now=1.0)
    assert len(ledger.engines[E1].tries) == 100
    ledger.started(1, "fake-0", E1, 1e6, now=1.0)  # one already kept: a hedge of it still counts
    assert ledger.engines[E1].tries[(1, "fake-0")].open == 2


def test_an_envoy_flooding_recordings_of_no_model_slows_recordings_only_and_is_forgotten_with_it(monkeypatch):
    """Recordings streamed unread count at every model (decide/longform.py): an authenticated Envoy
    that reports thousands leaves each recording one piece at a time, never none, holds at most
    MOST_TRIES of them, and its claims go when its log stream does."""
    monkeypatch.setattr("control_plane.observe.ledger.MOST_TRIES", 100)
    ledger, outcomes, in_flight = Ledger(), Outcomes(), InFlight()
    honest = marked(entry(TRY_STARTED, endpoint=WORKER, seconds="300.0", key="key-a", request_id="real"),
                    "x-whisper-longform")
    record(honest, 2, outcomes, ledger, in_flight, now=1.0)
    settings = parse_config({"models": ["m", "n"], "longform": {"workers": 1}}).longform
    engines = {"m": 4, "n": 2}
    alone = pieces_at_once(settings, engines, set(), ledger.recordings_at())
    assert alone == {"m": 48, "n": 24}
    for n in range(1000):
        flood = marked(entry(TRY_STARTED, endpoint=WORKER, seconds="0.000", key="key-a", request_id=f"fake-{n}"),
                       "x-whisper-longform")
        del flood.request.request_headers["x-whisper-model"]
        record(flood, 1, outcomes, ledger, in_flight, now=2.0)
    assert sum(ledger.recordings_at().values()) == 100  # the honest one and 99 of the flood
    assert pieces_at_once(settings, engines, {"m", "n"}, ledger.recordings_at()) == {"m": 1, "n": 1}
    ledger.stream_closed(1, now=3.0)
    assert ledger.recordings_at() == {"m": 1}
    assert pieces_at_once(settings, engines, set(), ledger.recordings_at()) == alone
