"""Which tries count as their engine failing (observe/outcomes.py): table tests on log entries
shaped as Envoy 1.40 sent them in real runs (a gateway of two simulated engines, hedging after
1 s, route_s 4): status, response flags, details and transport failure reason as logged."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from control_plane.observe.access_logs import REQUEST_ENDED, TRY_ENDED, record
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes, failed, route_timed_out

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"
REFUSED = "delayed connect error: Connection refused"


def logged(kind=TRY_ENDED, status=0, flags=(), details="", failure_reason="", endpoint=E1, request_id="r1",
           cluster="model:m") -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry with what Envoy logged of it: its response flags by name (all others unset)."""
    host, port = endpoint.rsplit(":", 1)
    common = accesslog_pb2.AccessLogCommon(
        access_log_type=kind, upstream_cluster=cluster, upstream_transport_failure_reason=failure_reason,
        upstream_remote_address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=host, port_value=int(port))))
    for name in flags:
        setattr(common.response_flags, name, True)
    response = accesslog_pb2.HTTPResponseProperties(response_code_details=details)
    if status:
        response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=status))
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common, response=response,
        request=accesslog_pb2.HTTPRequestProperties(request_id=request_id,
                                                    request_headers={"x-whisper-model": "m",
                                                                     "x-whisper-audio-seconds": "1.000"}))


TRIES = [
    # (what, the try's entry, failed: True, False, or None for no evidence either way)
    ("answered", logged(status=200), False),
    ("a hedge's winner, answered after its per-try deadline", logged(status=200, flags=["upstream_request_timeout"]),
     False),
    ("a hedge's loser: Envoy reset it at the winner's headers", logged(), None),
    ("a try whose client went away (with or without a hedge)", logged(), None),
    ("the route's timeout reset it (its request's entry counts it)", logged(), None),
    ("past its per-try deadline, then lost the hedge", logged(flags=["upstream_request_timeout"]), True),
    ("past its per-try deadline, then its client went away", logged(flags=["upstream_request_timeout"]), True),
    ("the engine's 503", logged(status=503), True),
    ("the engine's 500 (a client's odd upload can cause it)", logged(status=500), False),
    ("the engine's 400", logged(status=400), False),
    ("200, then the connection cut", logged(status=200, flags=["upstream_protocol_error"]), True),
    ("reset by the engine", logged(flags=["upstream_remote_reset"]), True),
    ("its connection refused", logged(flags=["upstream_connection_failure"], failure_reason=REFUSED), True),
    ("its connection closed before an answer", logged(flags=["upstream_connection_termination"]), True),
    ("no answer in its per-try idle time", logged(flags=["stream_idle_timeout"]), True),
    ("its host's circuit breaker (as before: no answer, flagged)", logged(flags=["upstream_overflow"]), True),
]


@pytest.mark.parametrize("what,entry,expected", TRIES, ids=[c[0] for c in TRIES])
def test_which_tries_failed(what, entry, expected):
    assert failed(entry) is expected


REQUESTS = [
    # (what, the request's entry, the route's timeout ended it at its last try's engine)
    ("the route's timeout, its one try in flight",
     logged(REQUEST_ENDED, status=504, flags=["upstream_request_timeout"], details="response_timeout"), True),
    ("the route's timeout after hedges that timed out",
     logged(REQUEST_ENDED, status=504, flags=["upstream_request_timeout", "upstream_retry_limit_exceeded"],
            details="response_timeout"), True),
    ("a recording's at its longform worker: no engine's",
     logged(REQUEST_ENDED, status=504, flags=["upstream_request_timeout"], details="response_timeout",
            cluster="whisper:longform"), False),
    ("its client went away",
     logged(REQUEST_ENDED, flags=["downstream_connection_termination"], details="downstream_remote_disconnect"), False),
    ("retries spent on refused connections",
     logged(REQUEST_ENDED, status=503, flags=["upstream_connection_failure", "upstream_retry_limit_exceeded"],
            failure_reason=REFUSED, details="upstream_reset_before_response_started"
                                            "{remote_connection_failure|delayed_connect_error:_Connection_refused}"),
     False),
]


@pytest.mark.parametrize("what,entry,expected", REQUESTS, ids=[c[0] for c in REQUESTS])
def test_which_requests_the_route_timed_out(what, entry, expected):
    assert route_timed_out(entry) is expected


RUNS = [
    # (what, the entries in the order Envoy sent them, (ok, failed) at E1, at E2)
    ("hedged: the first try answers after its deadline, the hedge is reset",
     [logged(endpoint=E2), logged(status=200, flags=["upstream_request_timeout"])], (1, 0), (0, 0)),
    ("hedged: the hedge answers, the first try (past its deadline) is reset",
     [logged(flags=["upstream_request_timeout"]), logged(status=200, endpoint=E2)], (0, 1), (1, 0)),
    ("the client went away before the deadline", [logged(), logged(REQUEST_ENDED, flags=[
        "downstream_connection_termination"], details="downstream_remote_disconnect")], (0, 0), (0, 0)),
    ("unhedged, the route's timeout: counted once, from the request's entry",
     [logged(), logged(REQUEST_ENDED, status=504, flags=["upstream_request_timeout"], details="response_timeout")],
     (0, 1), (0, 0)),
]


@pytest.mark.parametrize("what,entries,at_e1,at_e2", RUNS, ids=[c[0] for c in RUNS])
def test_evidence_from_a_requests_entries(what, entries, at_e1, at_e2):
    outcomes, ledger = Outcomes(), Ledger()
    for entry in entries:
        record(entry, 1, outcomes, ledger, InFlight(), now=1.0)
    for endpoint, expected in ((E1, at_e1), (E2, at_e2)):
        tally = outcomes._tallies.get(endpoint)
        assert ((round(tally.ok), round(tally.failed)) if tally else (0, 0)) == expected, endpoint
