"""Per-key quotas in requests and audio-seconds, enforced by real Envoy's rate limit filters.

Clips are silent WAVs of known length, so each upload's cost (its audio-seconds, rounded up) is
exact; the windows are a minute and a UTC day, so a budget spent here stays spent for the test.
"""

from __future__ import annotations

import http.client
import time
from datetime import datetime, timedelta, timezone

import pytest
from openai import OpenAI, RateLimitError

from harness.processes import Envoy, GatewayStack, multipart, request, silent_wav, start_engine, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
PLANS = {
    "three": {"requests_per_minute": 3, "audio_seconds_per_minute": 1000},
    "audio": {"requests_per_minute": 1000, "audio_seconds_per_minute": 20},
    "daily": {"requests_per_minute": 1000, "audio_seconds_per_minute": 1000, "audio_seconds_per_day": 10},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quotas")
    engine = start_engine(tmp_path, MODEL, "q1", time_scale=0.0001)
    gateway = GatewayStack(tmp_path, MODEL, [engine[1]], aliases=("whisper-1",),
                           auth={"api_keys": "required", "plans": PLANS})
    yield gateway
    gateway.stop()
    engine[0].stop()


def new_key(stack, name: str, plan: str | None = None) -> str:
    answer = stack.admin.call("POST", "/keys", {"name": name} | ({"plan": plan} if plan else {}))
    assert answer.status == 201, answer.text
    return answer.json()["secret"]


def send(stack, secret: str, seconds: float = 1.0):
    body = multipart([("model", MODEL, None), ("file", silent_wav(seconds), "clip.wav")])
    return request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, {
        "Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk", "Authorization": f"Bearer {secret}"})


def engine_requests(stack) -> int:
    return stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total")


def test_requests_per_minute_count_down_then_429_with_openai_headers(stack):
    secret = new_key(stack, "rpm", "three")
    seen = []
    for _ in range(3):
        answer = send(stack, secret)
        assert answer.status == 200, answer.text
        seen.append(answer.headers)
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert all(h["x-ratelimit-limit-requests"] == "3" for h in seen)
    assert seen[0]["x-ratelimit-limit-audio-seconds"] == "1000" and seen[0]["x-ratelimit-remaining-audio-seconds"] == "999"
    assert seen[2]["x-ratelimit-reset-requests"] == "60s"  # all three tokens back in a minute
    assert "x-ratelimit-limit" not in seen[0]  # Envoy's own names are replaced
    before = engine_requests(stack)
    refused = send(stack, secret)
    assert refused.status == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one token back: 60 s / 3
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert engine_requests(stack) == before  # no engine saw it


def test_audio_seconds_per_minute_charge_each_uploads_length(stack):
    secret = new_key(stack, "apm", "audio")
    assert send(stack, secret, 7.5).headers["x-ratelimit-remaining-audio-seconds"] == "12"  # 7.5 s costs 8
    assert send(stack, secret, 7.5).headers["x-ratelimit-remaining-audio-seconds"] == "4"
    refused = send(stack, secret, 7.5)
    assert refused.status == 429 and refused.json()["error"]["type"] == "audio_seconds"
    assert int(refused.headers["retry-after"]) == 12  # 4 more audio-seconds at 20 a minute
    assert send(stack, secret, 3.0).status == 200  # a shorter clip still fits


def test_an_upload_longer_than_the_window_allows_is_told_why(stack):
    secret = new_key(stack, "too-long", "audio")
    before = engine_requests(stack)
    refused = send(stack, secret, 25.0)
    assert refused.status == 429 and "25 audio-seconds" in refused.json()["error"]["message"]
    assert "retry-after" not in refused.headers  # waiting would not help
    assert engine_requests(stack) == before
    assert send(stack, secret, 5.0).status == 200  # and it cost nothing


def test_keys_have_buckets_of_their_own_that_key_changes_do_not_refill(stack):
    first, second = new_key(stack, "own-1", "three"), new_key(stack, "own-2", "three")
    for _ in range(3):
        assert send(stack, first).status == 200
    assert send(stack, first).status == 429
    assert send(stack, second).status == 200  # the same plan, another bucket
    new_key(stack, "unrelated", "three")  # a route update: the quota filters do not change
    stack.admin.call("PATCH", "/keys/" + next(k["id"] for k in stack.admin.call("GET", "/keys").json()["data"]
                                             if k["name"] == "own-2"), {"class": "batch"})
    assert send(stack, first).status == 429


def test_a_key_without_a_plan_has_no_limits(stack):
    secret = new_key(stack, "unlimited")
    answer = send(stack, secret)
    assert answer.status == 200 and not any(h.startswith("x-ratelimit") for h in answer.headers)


def test_the_sdk_raises_rate_limit_error_and_refusals_are_metered(stack):
    key = stack.admin.call("POST", "/keys", {"name": "sdk-limited", "plan": "three"}).json()
    client = OpenAI(base_url=stack.envoy.url + "/v1", api_key=key["secret"], max_retries=0)
    for _ in range(3):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(2.0)))
    with pytest.raises(RateLimitError) as raised:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(2.0)))
    assert raised.value.response.headers["retry-after"]

    def usage():
        return stack.admin.call("GET", f"/keys/{key['id']}").json()["usage"].get(MODEL, {})

    wait_until(lambda: usage().get("requests") == 4, 10, "the four requests metered")
    assert usage()["audio_served_s"] == pytest.approx(6.0, abs=0.01)
    assert usage()["audio_refused_s"] == pytest.approx(2.0, abs=0.01)


BAD = [
    ("unknown plan", "POST", "/keys", {"name": "p1", "plan": "gold"}),
    ("plan not a string", "POST", "/keys", {"name": "p2", "plan": 3}),
]


@pytest.mark.parametrize("what,method,path,body", BAD, ids=[b[0] for b in BAD])
def test_a_plan_that_does_not_exist_is_refused(stack, what, method, path, body):
    answer = stack.admin.call(method, path, body)
    assert answer.status == 400 and answer.json()["error"]["param"] == "plan"


def test_one_keep_alive_connection_gets_the_keys_whole_budget_behind_two_envoys(tmp_path):
    """Two Envoys on one port (the kernel splits connections between them), a client on one
    connection: it reaches one Envoy only, and gets its key's whole budget there, where an even
    split would give it half; an upload of a whole minute's budget passes."""
    engine = start_engine(tmp_path, MODEL, "q2", time_scale=0.0001)[1]
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "plans": {
        "sixty": {"requests_per_minute": 10_000, "audio_seconds_per_minute": 60}}})
    second = Envoy(tmp_path, stack.raw, name="envoy-2")
    second.wait_serving()
    wait_until(lambda: len(stack.admin.status()["envoys"]) == 2, 10, "both Envoys connected")
    secret = new_key(stack, "one-connection", "sixty")
    connection = http.client.HTTPConnection("127.0.0.1", int(stack.envoy.url.rsplit(":", 1)[1]), timeout=30)

    def send_here(seconds: float) -> tuple[int, dict]:
        body = multipart([("model", MODEL, None), ("file", silent_wav(seconds), "clip.wav")])
        connection.request("POST", "/v1/audio/transcriptions", body, {
            "Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk", "Authorization": f"Bearer {secret}"})
        answer = connection.getresponse()
        answer.read()
        return answer.status, dict(answer.getheaders())

    status, headers = send_here(60.0)  # the whole minute's budget, through one of two Envoys
    assert status == 200 and headers["x-ratelimit-remaining-audio-seconds"] == "0"
    # Then twice what the plan allows, as 1 s clips: admitted at the plan's rate, one a second.
    admitted, start, sent = 0, time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < 20:
        status, headers = send_here(1.0)
        assert status in (200, 429), status
        admitted += status == 200
        sent += 1
        time.sleep(max(0.0, start + sent * 0.5 - time.monotonic()))
    allowed = 60 * elapsed / 60
    assert 0.8 * allowed <= admitted <= 1.2 * allowed + 1, (admitted, allowed)
    key = next(k for k in stack.admin.call("GET", "/keys").json()["data"] if k["name"] == "one-connection")
    assert key["budget"]["charge"]["audio_seconds"] == 1.0  # all through one Envoy: charged once there
    second.stop()
    stack.stop()


def test_a_days_budget_is_counted_in_the_durable_usage_and_stays_spent_across_a_restart(tmp_path):
    engine = start_engine(tmp_path, MODEL, "q3", time_scale=0.0001)[1]
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "plans": {
        "daily": {"requests_per_minute": 1000, "audio_seconds_per_minute": 1000, "audio_seconds_per_day": 10}}})
    secret = new_key(stack, "daily", "daily")
    too_long = send(stack, secret, 12.0)  # more than a whole day's: told at once, charged nothing
    assert too_long.status == 429 and "per day" in too_long.json()["error"]["message"]
    assert send(stack, secret, 8.0).status == 200
    refused = wait_until(lambda: (r := send(stack, secret, 1.0)).status == 429 and r, 15, "the day's budget spent",
                         interval=0.5)
    error = refused.json()["error"]
    assert error["type"] == "audio_seconds_per_day" and error["code"] == "rate_limit_exceeded"
    midnight = (datetime.now(timezone.utc) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(int(refused.headers["retry-after"]) - (midnight - datetime.now(timezone.utc)).total_seconds()) <= 5
    stack.restart_plane()  # its usage is durable: the day stays spent
    wait_until(lambda: len(stack.admin.status()["envoys"]) == 1, 10, "the Envoy reconnected")
    stack.admin.call("POST", "/keys", {"name": "a-route-update"})  # the routes published again
    assert [send(stack, secret, 1.0).status for _ in range(3)] == [429] * 3
    usage = stack.admin.call("GET", "/usage").json()["data"]
    served = sum(row["audio_served_s"] for row in usage)
    # 8, and the 1 s clips sent (two a second) before the refusal reached the Envoy: about a second's
    assert 10 <= served <= 14, served
    stack.stop()


def test_a_client_cannot_spend_or_refill_a_keys_budget_with_headers_of_its_own(stack):
    """The quota filters read the Lua filter's dynamic metadata, never request headers: not on
    routes the filter does not run on, not on an upload it charges."""
    key = stack.admin.call("POST", "/keys", {"name": "forged-at", "plan": "three"}).json()
    forged = {"x-whisper-plan": "three", "x-whisper-key-id": key["id"], "x-whisper-audio-cost": "-1000",
              "Authorization": f"Bearer {key['secret']}"}
    for _ in range(5):
        assert request("GET", stack.envoy.url + "/v1/models", headers=forged).status == 200
    answers = []
    for _ in range(4):
        body = multipart([("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")])
        answers.append(request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, forged | {
            "Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}))
    assert [a.status for a in answers] == [200, 200, 200, 429]  # three a minute, as the plan says
    assert answers[0].headers["x-ratelimit-remaining-audio-seconds"] == "999"  # charged 1, not -1000
