"""Per-key quotas in requests and audio-seconds, enforced by real Envoy's rate limit filters.

Clips are silent WAVs of known length, so each upload's cost (its audio-seconds, rounded up) is
exact; the windows are a minute and a day, so a bucket emptied here stays empty for the test.
"""

from __future__ import annotations

import pytest
from openai import OpenAI, RateLimitError

from control_plane.names import LOCAL_CLUSTER
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


def test_audio_seconds_per_day(stack):
    secret = new_key(stack, "daily", "daily")
    assert send(stack, secret, 8.0).status == 200
    refused = send(stack, secret, 8.0)
    assert refused.status == 429 and refused.json()["error"]["type"] == "audio_seconds_per_day"
    assert int(refused.headers["retry-after"]) == 8 * 86400 // 10


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


def test_two_envoys_share_a_key_budget(tmp_path):
    """Each Envoy takes half of every budget when two are connected: together they admit it once."""
    engine = start_engine(tmp_path, MODEL, "q2", time_scale=0.0001)[1]
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required", "plans": {
        "six": {"requests_per_minute": 6, "audio_seconds_per_minute": 1000}}})
    second = Envoy(tmp_path, stack.raw, name="envoy-2")  # the same port: the kernel splits connections
    second.wait_serving()
    wait_until(lambda: len(stack.admin.status()["envoys"]) == 2, 10, "both Envoys connected")
    # Envoy learns its share from the control plane's cluster of Envoys: two members.
    wait_until(lambda: all(len(e.endpoints().get(LOCAL_CLUSTER, {})) == 2 for e in (stack.envoy, second)), 10,
               "both Envoys told there are two")
    secret = new_key(stack, "shared", "six")
    envoys = (stack.envoy, second)
    before = [e.stat("http.whisper.downstream_rq_2xx") for e in envoys]
    answers = [send(stack, secret) for _ in range(30)]  # a new connection each time
    statuses = [a.status for a in answers]
    admitted = {e.admin: e.stat("http.whisper.downstream_rq_2xx") - b for e, b in zip(envoys, before)}
    # A token comes back to an Envoy every 2 x 60 / 6 s: it charges twice the cost of a request.
    assert {a.headers["retry-after"] for a in answers if a.status == 429} == {"20"}
    assert statuses.count(200) <= 6 and set(statuses) <= {200, 429}
    assert all(count <= 3 for count in admitted.values()), admitted  # each Envoy half of the six
    assert sum(admitted.values()) == statuses.count(200)


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
