"""Priority lanes: batch keys wait while a model is backed up; interactive keys keep flowing."""

from __future__ import annotations

import threading

import pytest

from control_plane.decide.lanes import REOPEN_AT, closed_to_batch
from harness.processes import GatewayStack, multipart, request, silent_wav, start_engine, wait_until

MODEL = "whisper-large-v3-turbo"
LEVEL_S = 1.0

LANES = [
    # (what, waits, closed before, closed after)
    ("quiet: open", {"m": 0.4}, {}, {}),
    ("over the level: closed, Retry-After from the wait", {"m": 3.2}, {}, {"m": 3}),
    ("between reopen and level: stays closed", {"m": 0.8}, {"m": 3}, {"m": 3}),
    ("between reopen and level: stays open", {"m": 0.8}, {}, {}),
    ("under the reopen point: open again", {"m": REOPEN_AT * LEVEL_S - 0.01}, {"m": 3}, {}),
    ("no fresh engine: as it was", {"m": None}, {"m": 3}, {"m": 3}),
    ("models apart", {"m": 5.0, "n": 0.1}, {}, {"m": 5}),
]


@pytest.mark.parametrize("what,waits,before,after", LANES, ids=[c[0] for c in LANES])
def test_when_a_lane_closes_and_opens(what, waits, before, after):
    assert closed_to_batch(waits, before, LEVEL_S) == after


def send(stack, secret: str, seconds: float):
    body = multipart([("model", MODEL, None), ("file", silent_wav(seconds), "clip.wav")])
    return request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, {
        "Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk", "Authorization": f"Bearer {secret}"},
        timeout=60)


@pytest.mark.e2e
def test_batch_keys_wait_while_the_model_is_backed_up(tmp_path):
    engine = start_engine(tmp_path, MODEL, "l1", max_num_seqs=1)[1]  # a 30 s chunk takes 0.25 s
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "batch_above_wait_s": LEVEL_S})
    live = stack.admin.call("POST", "/keys", {"name": "live"}).json()["secret"]
    bulk = stack.admin.call("POST", "/keys", {"name": "bulk", "class": "batch"}).json()["secret"]
    assert send(stack, live, 30.0).status == 200  # the engine's speed, measured

    def lane() -> str:
        return stack.admin.status()["models"][0]["batch"]

    flood: list[int] = []
    # Recordings of five minutes: one admitted holds the engine for 2.5 s, long enough to look.
    threads = [threading.Thread(target=lambda: flood.append(send(stack, bulk, 300.0).status)) for _ in range(6)]
    for thread in threads:
        thread.start()
    # The lane may close before the last of them arrives: those get 429 like any batch request.
    wait_until(lambda: lane() == "refused", 20, "the batch lane closed")
    # /status shows the decision once made; Envoy applies it a moment later. A clip sent before it
    # did is served, behind the recordings queued at the engine (up to 15 s on a busy machine).
    wait_until(lambda: send(stack, bulk, 5.0).status == 429, 60, "Envoy refusing batch requests")

    refused = send(stack, bulk, 5.0)
    # The gateway's own answer (no engine says batch_lane). Envoy's count of tries at the engine is
    # no proof here: the queued recordings' hedges and retries start tries meanwhile (it failed so
    # once in CI); test_batch_keys_share_a_cap... below checks it with nothing else in flight.
    assert refused.status == 429 and refused.json()["error"]["type"] == "batch_lane"
    assert int(refused.headers["retry-after"]) >= 1
    assert send(stack, live, 5.0).status == 200  # interactive keys are never refused

    for thread in threads:
        thread.join(60)
    assert set(flood) <= {200, 429} and flood.count(200) >= 1  # what was admitted before it closed is served
    wait_until(lambda: lane() == "admitted", 30, "the batch lane open again")
    wait_until(lambda: send(stack, bulk, 5.0).status == 200, 10, "Envoy serving batch requests again")


@pytest.mark.e2e
def test_batch_keys_share_a_cap_of_requests_in_flight_per_engine(tmp_path):
    """auth.batch_in_flight_per_engine: all batch keys together hold at most that many requests per
    serving engine (granted to Envoy over RLQS like a key's requests_in_flight); interactive keys
    are not counted and never refused."""
    engine = start_engine(tmp_path, MODEL, "c1", seconds_per_request=1.0, time_scale=1.0)[1]
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "batch_in_flight_per_engine": 1})
    first, other = (stack.admin.call("POST", "/keys", {"name": n, "class": "batch"}).json()["secret"]
                    for n in ("nightly", "backfill"))
    live = stack.admin.call("POST", "/keys", {"name": "live"}).json()["secret"]

    def model_row() -> dict:
        return stack.admin.status()["models"][0]

    assert model_row()["batch_in_flight_limit"] == 1
    held: list[int] = []
    thread = threading.Thread(target=lambda: held.append(send(stack, first, 1.0).status))
    thread.start()
    wait_until(lambda: model_row()["batch_in_flight"] == 1, 10, "one batch request in flight")
    metrics = request("GET", stack.admin.url + "/metrics").text
    assert f'whisper_gateway_model_batch_in_flight{{model="{MODEL}"}} 1.0' in metrics
    forwarded = stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total")
    refused = send(stack, other, 1.0)  # another batch key: the cap is the model's, not the key's
    assert refused.status == 429, refused.text
    assert refused.json()["error"]["type"] == "batch_lane" and refused.headers["retry-after"] == "1"
    assert stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total") == forwarded  # no engine saw it
    assert send(stack, live, 1.0).status == 200  # interactive keys are not held back
    thread.join(30)
    assert held == [200]
    wait_until(lambda: model_row()["batch_in_flight"] == 0, 10, "the batch request's end logged")
    metrics = request("GET", stack.admin.url + "/metrics").text
    assert f'whisper_gateway_model_batch_in_flight{{model="{MODEL}"}} 0.0' in metrics
    assert send(stack, other, 1.0).status == 200
