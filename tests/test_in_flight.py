"""Requests in flight, limited through real Envoy: the control plane counts them from the access
logs and grants each Envoy its part of the free slots over RLQS (xds/quota_service.py), per key
(a plan's requests_in_flight) and per model's batch lane (auth.batch_in_flight_per_engine).

The engine takes about a second per clip, so two requests of a key are in flight long enough to
look; the test waits on what /status says, then on what Envoy answers, never on a timer.
"""

from __future__ import annotations

import threading
import time

import pytest
from openai import OpenAI, RateLimitError

from control_plane.config import ConfigError, load_config
from harness.processes import Envoy, GatewayStack, post_form, request, silent_wav, start_engine, wait_until
from tests.test_quotas import engine_requests

MODEL = "whisper-large-v3-turbo"
PLANS = {"two": {"requests_per_minute": 1000, "audio_seconds_per_minute": 100000, "requests_in_flight": 2},
         "open": {"requests_per_minute": 1000, "audio_seconds_per_minute": 100000},
         "three_a_minute": {"requests_per_minute": 3, "audio_seconds_per_minute": 100000, "requests_in_flight": 2},
         "one": {"requests_per_minute": 1000, "audio_seconds_per_minute": 100000, "requests_in_flight": 1}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("in_flight")
    # One clip alone: 1 s of work; two at once share the engine (both in flight about 2 s).
    engine = start_engine(tmp_path, MODEL, "f1", seconds_per_request=1.0, time_scale=1.0)
    gateway = GatewayStack(tmp_path, MODEL, [engine[1]], auth={"api_keys": "required", "plans": PLANS},
                           metrics={"key_labels": True})  # the per-key gauge below
    yield gateway
    gateway.stop()
    engine[0].stop()


def new_key(stack, name: str, plan: str) -> dict:
    answer = stack.admin.call("POST", "/keys", {"name": name, "plan": plan})
    assert answer.status == 201, answer.text
    return answer.json()


def send(stack, secret: str):
    return post_form(stack.envoy.url + "/v1/audio/transcriptions",
                     [("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")],
                     headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def row(stack, key_id: str) -> dict:
    rows = {r["key"]: r for r in stack.admin.status()["requests_in_flight"]}
    return rows.get(key_id, {"in_flight": 0, "refused": False})


def hold_two(stack, secret: str) -> tuple[list[threading.Thread], list[int]]:
    """Two requests of the key, in flight until the engine answers them."""
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(send(stack, secret).status)) for _ in range(2)]
    for thread in threads:
        thread.start()
    return threads, statuses


@pytest.mark.e2e
def test_a_key_at_its_limit_gets_429_until_one_of_its_requests_ends(stack):
    key, other = new_key(stack, "held", "two"), new_key(stack, "neighbour", "two")
    threads, statuses = hold_two(stack, key["secret"])
    wait_until(lambda: row(stack, key["id"])["refused"], 10, "the key refused once two are in flight")
    assert row(stack, key["id"]) == {"key": key["id"], "in_flight": 2, "limit": 2, "refused": True}
    gauge = f'whisper_gateway_key_requests_in_flight{{key="{key["id"]}"}} 2.0'
    assert gauge in request("GET", stack.admin.url + "/metrics").text

    before = engine_requests(stack)
    refused = send(stack, key["secret"])
    assert refused.status == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "requests_in_flight" and error["code"] == "rate_limit_exceeded"
    assert "requests_in_flight" in error["message"]
    assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "100"
    assert refused.headers["content-type"] == "application/json"
    assert engine_requests(stack) == before  # no engine saw it
    assert send(stack, other["secret"]).status == 200  # another key of the same plan is not held back

    for thread in threads:
        thread.join()
    assert statuses == [200, 200]
    wait_until(lambda: not row(stack, key["id"])["refused"], 10, "the key let through again")
    assert send(stack, key["secret"]).status == 200
    wait_until(lambda: stack.admin.call("GET", f"/keys/{key['id']}").json()["requests_in_flight"] == 0, 10,
               "its last request's end logged")

    def usage():
        return stack.admin.call("GET", f"/keys/{key['id']}").json()["usage"].get(MODEL, {})

    wait_until(lambda: usage().get("requests") == 4, 10, "the four requests metered")
    assert usage()["audio_refused_s"] == pytest.approx(1.0, abs=0.01)  # the 429: refused, not failed
    assert gauge not in request("GET", stack.admin.url + "/metrics").text  # none in flight now


@pytest.mark.e2e
def test_a_request_another_limit_refuses_gives_its_slot_back(stack):
    """The requests-per-minute filter comes after the in-flight one: what it refuses took a slot,
    which the request's log gives back, so the key keeps hearing about the limit it is over."""
    key = new_key(stack, "rpm-and-slots", "three_a_minute")

    def metered() -> int:  # the logs of its requests, read (and any slot given back)
        return stack.admin.call("GET", f"/keys/{key['id']}").json()["usage"].get(MODEL, {}).get("requests", 0)

    for sent in range(1, 8):
        answer = send(stack, key["secret"])
        assert answer.status == (200 if sent <= 3 else 429), answer.text
        if sent > 3:
            assert answer.json()["error"]["type"] == "requests", answer.text
        wait_until(lambda: metered() == sent, 10, "its log read")


@pytest.mark.e2e
def test_the_sdk_raises_rate_limit_error_and_a_key_without_the_limit_is_not_held(stack):
    key, free = new_key(stack, "sdk-held", "two"), new_key(stack, "unlimited", "open")
    threads, _ = hold_two(stack, key["secret"])
    wait_until(lambda: row(stack, key["id"])["refused"], 10, "the key refused")
    client = OpenAI(base_url=stack.envoy.url + "/v1", api_key=key["secret"], max_retries=0)
    with pytest.raises(RateLimitError) as raised:
        client.audio.transcriptions.create(model=MODEL, file=("a.wav", silent_wav(1.0)))
    assert raised.value.body["type"] == "requests_in_flight"
    unlimited, done = hold_two(stack, free["secret"])
    wait_until(lambda: row(stack, free["id"])["in_flight"] == 2, 10, "the other key's two in flight")
    assert row(stack, free["id"])["refused"] is False and row(stack, free["id"])["limit"] is None
    assert send(stack, free["secret"]).status == 200  # a third of a key without the limit
    for thread in threads + unlimited:
        thread.join()
    assert done == [200, 200]


@pytest.mark.e2e
def test_a_restarted_control_plane_holds_no_key_back_and_limits_again(stack):
    """Last in the module: it restarts the control plane."""
    key = new_key(stack, "restarted", "two")
    threads, statuses = hold_two(stack, key["secret"])
    wait_until(lambda: row(stack, key["id"])["refused"], 10, "the key refused")
    stack.restart_plane(kill=True)
    for thread in threads:
        thread.join()
    assert statuses == [200, 200]
    # The Envoy keeps the old grant (none free) until the new plane answers its next report.
    wait_until(lambda: send(stack, key["secret"]).status == 200, 30, "the key served by the restarted plane")
    # A slot is the key's again once the end of the request holding it is logged to the plane.
    wait_until(lambda: row(stack, key["id"])["in_flight"] == 0, 10, "the last request's end logged")
    # The old grants lapsed while the plane was away (fail-open); Envoy gets the new plane's with
    # its next report, at most one report interval after its RLQS stream is back: no event shows it.
    from control_plane.names import IN_FLIGHT_REPORT_S

    time.sleep(IN_FLIGHT_REPORT_S + 0.5)
    threads, statuses = hold_two(stack, key["secret"])
    wait_until(lambda: row(stack, key["id"])["refused"], 10, "the key refused again, counted by the new plane")
    assert send(stack, key["secret"]).status == 429
    for thread in threads:
        thread.join()
    assert statuses == [200, 200]


@pytest.mark.e2e
def test_a_key_at_its_limit_is_admitted_again_soon_while_the_control_plane_is_away(stack):
    """Last in the module, after the restart: the plane stops with the key's slots all taken; the
    grants Envoy holds lapse after ASSIGNMENT_TTL_S, then Envoy admits the key (fail-open) while
    no plane answers."""
    from control_plane.xds.quota_service import ASSIGNMENT_TTL_S

    stack.restart_plane()  # the restart test's plane went with that test
    wait_until(lambda: stack.admin.status()["envoys"], 15, "Envoy back on the plane")
    key = new_key(stack, "while-away", "two")  # answered once Envoy applied it
    threads, statuses = hold_two(stack, key["secret"])
    wait_until(lambda: row(stack, key["id"])["refused"], 10, "the key refused")
    stack.plane.kill()
    stopped = time.monotonic()
    try:
        # Within the grants' life (5 s) and a report's slack; 15 s before issue 27.
        wait_until(lambda: send(stack, key["secret"]).status == 200, 10, "the key admitted again")
        assert time.monotonic() - stopped <= ASSIGNMENT_TTL_S + 3 <= 8
    finally:
        for thread in threads:
            thread.join()
    assert statuses == [200, 200]


@pytest.mark.e2e
def test_two_envoys_share_a_limit_of_one_and_neither_is_left_without_it(tmp_path):
    """One slot, two Envoys on one port (the kernel splits connections): the Envoy that holds none
    and refuses for want of it gets the slot at its next report, so every request is served in
    the end, by both Envoys, and never two at once."""
    engine = start_engine(tmp_path, MODEL, "f2", seconds_per_request=0.3, time_scale=1.0)[1]
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "plans": PLANS})
    second = Envoy(tmp_path, stack.raw, name="envoy-2")
    second.wait_serving()
    wait_until(lambda: len(stack.admin.status()["envoys"]) == 2, 10, "both Envoys connected")
    key = new_key(stack, "shared-slot", "one")
    envoys = (stack.envoy, second)
    before = [e.stat("http.whisper.downstream_rq_2xx") for e in envoys]
    for _ in range(8):  # a new connection each time, each sent again after a 429 until served
        wait_until(lambda: send(stack, key["secret"]).status == 200, 30, "a request served")
    served = [e.stat("http.whisper.downstream_rq_2xx") - b for e, b in zip(envoys, before)]
    assert sum(served) == 8 and all(served), served
    assert row(stack, key["id"])["limit"] == 1


@pytest.mark.parametrize("value", [0, -1, "2", 100_001, 2.5])
def test_an_absurd_limit_is_refused_at_load(tmp_path, value):
    path = tmp_path / "gateway.yaml"
    path.write_text(f"""
models:
  - name: {MODEL}
    backends: [{{url: "http://127.0.0.1:9"}}]
auth:
  api_keys: required
  plans:
    p: {{requests_per_minute: 10, audio_seconds_per_minute: 10, requests_in_flight: {value!r}}}
""")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "requests_in_flight" in str(raised.value)
