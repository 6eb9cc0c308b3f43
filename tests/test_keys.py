"""API keys: made and changed through the admin API and CLI, checked by Envoy, kept only as digests.

Everything here goes through real processes: the control plane, Envoy (its Lua filter hashes
each bearer key), simulated engines that check their own --api-key as vLLM does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import threading
import sys

import pytest
from openai import AsyncOpenAI, AuthenticationError, OpenAI, PermissionDeniedError

from harness.processes import (REPO, GatewayStack, request, silent_wav, start_engine,
                               transcribe, wait_until)
from control_plane.config import ConfigError, parse_config
from control_plane.tenants.keys import KeyProblem, KeyTable, digest

MODEL, OTHER = "whisper-large-v3-turbo", "whisper-small"
ENGINE_KEY = "engine-secret-0123456789"
MAX_KEYS = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("keys")
    engine = start_engine(tmp_path, MODEL, "k1", time_scale=0.0001, api_key=ENGINE_KEY)
    other = start_engine(tmp_path, OTHER, "k2", time_scale=0.0001, api_key=ENGINE_KEY)
    os.environ["WHISPER_TEST_ENGINE_KEY"] = ENGINE_KEY  # the control plane reads it at start
    gateway = GatewayStack(tmp_path, MODEL, [engine[1]], aliases=("whisper-1",),
                           auth={"api_keys": "required", "engine_api_key_env": "WHISPER_TEST_ENGINE_KEY",
                                 "max_keys": MAX_KEYS},
                           metrics={"key_labels": True})  # /metrics names keys (tests/test_admin_roles.py: not by default)
    gateway.raw["models"].append({"name": OTHER})
    gateway.raw["backends"].append({"url": other[1], "models": [OTHER]})
    gateway.config.write(gateway.raw)
    gateway.restart_plane()
    wait_until(lambda: f"model:{OTHER}" in gateway.envoy.endpoints(), 20, "the second model routed")
    yield gateway
    gateway.stop()
    for process, _ in (engine, other):
        process.stop()


def create(stack, name: str, **fields) -> dict:
    answer = stack.admin.call("POST", "/keys", {"name": name} | fields)
    assert answer.status == 201, answer.text
    return answer.json()


def with_key(stack, secret: str | None, model: str = "whisper-1", extra_headers: dict | None = None):
    from harness.processes import multipart

    headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    headers.update(extra_headers or {})
    body = multipart([("model", model, None), ("file", silent_wav(1.0), "clip.wav")])
    return request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, headers)


def engine_requests(stack) -> int:
    return sum(stack.envoy.stat(f"cluster.model_{m}.upstream_rq_total") for m in (MODEL, OTHER))


def works(stack, secret: str) -> bool:
    return with_key(stack, secret).status == 200


@pytest.mark.e2e
def test_the_openai_sdk_sends_its_key_sync_async_and_streaming(stack):
    secret = create(stack, "sdk")["secret"]
    wait_until(lambda: works(stack, secret), 5, "the new key in Envoy")
    client = OpenAI(base_url=stack.envoy.url + "/v1", api_key=secret)
    assert client.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(1.0))).text
    chunks = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(1.0)), stream=True))
    assert chunks

    async def asynchronous():
        async with AsyncOpenAI(base_url=stack.envoy.url + "/v1", api_key=secret) as aclient:
            return await aclient.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(1.0)))

    assert asyncio.run(asynchronous()).text


REFUSED = [
    # (what, Authorization header or None)
    ("no header", None),
    ("not bearer", "Basic dXNlcjpwYXNz"),
    ("empty bearer", "Bearer "),
    ("unknown key", "Bearer sk-wg-not-a-key-at-all"),
    ("a key of 10 kB", "Bearer " + "x" * 10_000),
]


@pytest.mark.e2e
@pytest.mark.parametrize("what,header", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_request_without_a_valid_key_gets_401_and_reaches_no_engine(stack, what, header):
    before = engine_requests(stack)
    answer = with_key(stack, None, extra_headers={"Authorization": header} if header else None)
    assert answer.status == 401, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "AuthenticationError"
    assert "x" * 20 not in error["message"] and "not-a-key" not in error["message"]  # never echoed
    assert engine_requests(stack) == before


@pytest.mark.e2e
def test_the_sdk_raises_authentication_error_for_a_wrong_key(stack):
    client = OpenAI(base_url=stack.envoy.url + "/v1", api_key="sk-wg-wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as raised:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav(1.0)))
    assert raised.value.status_code == 401


@pytest.mark.e2e
def test_a_key_limited_to_models_gets_403_for_others(stack):
    secret = create(stack, "only-turbo", models=[MODEL])["secret"]
    wait_until(lambda: works(stack, secret), 5, "the new key in Envoy")
    before = engine_requests(stack)
    client = OpenAI(base_url=stack.envoy.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(PermissionDeniedError) as raised:
        client.audio.transcriptions.create(model=OTHER, file=("a.wav", silent_wav(1.0)))
    assert raised.value.body["code"] == "model_not_allowed"
    assert engine_requests(stack) == before
    assert with_key(stack, secret, model="whisper-1").status == 200  # an alias of an allowed model


@pytest.mark.e2e
def test_revoked_keys_stop_at_once_and_rotated_ones_after_their_grace(stack):
    key = create(stack, "rotating")
    wait_until(lambda: works(stack, key["secret"]), 5, "the new key in Envoy")
    rotated = stack.admin.call("POST", f"/keys/{key['id']}/rotate", {"grace_s": 2.0}).json()
    wait_until(lambda: works(stack, rotated["secret"]), 5, "the rotated secret in Envoy")
    assert works(stack, key["secret"])  # within its grace
    wait_until(lambda: with_key(stack, key["secret"]).status == 401, 10, "the old secret's grace ended")
    assert works(stack, rotated["secret"])
    revoked = stack.admin.call("DELETE", f"/keys/{key['id']}")
    assert revoked.status == 200 and revoked.json()["state"] == "revoked"
    wait_until(lambda: with_key(stack, rotated["secret"]).status == 401, 5, "the revoked key refused")
    assert stack.admin.call("POST", f"/keys/{key['id']}/rotate", {}).status == 409


@pytest.mark.e2e
def test_rotation_under_load_fails_no_request(stack):
    key = create(stack, "busy")
    wait_until(lambda: works(stack, key["secret"]), 5, "the new key in Envoy")
    secrets = [key["secret"]]
    statuses: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            statuses.append(with_key(stack, secrets[-1]).status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(3):
        answer = stack.admin.call("POST", f"/keys/{key['id']}/rotate", {})
        secrets.append(answer.json()["secret"])
        wait_until(lambda: works(stack, secrets[-1]), 5, "the rotated secret in Envoy")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))


@pytest.mark.e2e
def test_the_engines_see_their_own_key_never_the_clients(stack):
    """The engines run with --api-key: they answer 401 to anything else, so a 200 through the
    gateway means Envoy replaced the client's key with theirs."""
    secret = create(stack, "engine-check")["secret"]
    wait_until(lambda: works(stack, secret), 5, "the new key in Envoy")
    engine_url = stack.raw["backends"][0]["url"]
    assert transcribe(engine_url, MODEL).status == 401  # the engine does check


@pytest.mark.e2e
def test_usage_is_metered_per_key_and_sums_to_the_models(stack):
    key = create(stack, "metered")
    wait_until(lambda: works(stack, key["secret"]), 5, "the new key in Envoy")
    for _ in range(2):
        assert works(stack, key["secret"])

    def usage():
        return stack.admin.call("GET", f"/keys/{key['id']}").json()["usage"].get(MODEL, {})

    wait_until(lambda: usage().get("requests") == 3, 10, "three requests metered")
    assert usage()["audio_served_s"] == pytest.approx(3.0, abs=0.01)
    metrics = request("GET", stack.admin.url + "/metrics").text
    assert f'key="{key["id"]}"' in metrics
    per_key = sum(u.get(MODEL, {}).get("audio_received_s", 0) for u in
                  (k["usage"] for k in stack.admin.call("GET", "/keys").json()["data"]))
    model = next(m for m in stack.admin.status()["models"] if m["model"] == MODEL)
    assert per_key == pytest.approx(model["audio_received_s"], abs=0.01)


BAD_ADMIN = [
    # (what, method, path, body, status, param)
    ("no name", "POST", "/keys", {}, 400, "name"),
    ("empty name", "POST", "/keys", {"name": ""}, 400, "name"),
    ("name with a space", "POST", "/keys", {"name": "a b"}, 400, "name"),
    ("name not a string", "POST", "/keys", {"name": 7}, 400, "name"),
    ("name like a key id", "POST", "/keys", {"name": "key-prod"}, 400, "name"),
    ("unknown model", "POST", "/keys", {"name": "x1", "models": ["gpt-4"]}, 400, "models"),
    ("an alias, not a model", "POST", "/keys", {"name": "x2", "models": ["whisper-1"]}, 400, "models"),
    ("models twice", "POST", "/keys", {"name": "x3", "models": [MODEL, MODEL]}, 400, "models"),
    ("unknown class", "POST", "/keys", {"name": "x4", "class": "vip"}, 400, "class"),
    ("unknown field", "POST", "/keys", {"name": "x5", "secret": "mine"}, 400, "secret"),
    ("negative grace", "POST", "/keys/{id}/rotate", {"grace_s": -1}, 400, "grace_s"),
    ("absurd grace", "POST", "/keys/{id}/rotate", {"grace_s": 1e12}, 400, "grace_s"),
    ("unknown key", "DELETE", "/keys/key-000000000000", None, 404, "id"),
    ("duplicate name", "POST", "/keys", {"name": "taken"}, 409, "name"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("what,method,path,body,status,param", BAD_ADMIN, ids=[c[0] for c in BAD_ADMIN])
def test_bad_key_changes_are_refused_and_change_nothing(stack, what, method, path, body, status, param):
    existing = stack.admin.call("GET", "/keys").json()["data"]
    taken = next((k for k in existing if k["name"] == "taken" and k["state"] == "active"), None) or create(stack, "taken")
    before = (stack.plane.state_dir / "state.json").read_text()
    answer = stack.admin.call(method, path.replace("{id}", taken["id"]), body)
    assert answer.status == status, answer.text
    assert answer.json()["error"]["param"] == param
    assert (stack.plane.state_dir / "state.json").read_text() == before


@pytest.mark.e2e
def test_the_key_limit_is_refused_clearly(stack):
    active = [k for k in stack.admin.call("GET", "/keys").json()["data"] if k["state"] == "active"]
    fillers = [create(stack, f"fill-{i}") for i in range(MAX_KEYS - len(active))]
    answer = stack.admin.call("POST", "/keys", {"name": "one-too-many"})
    assert answer.status == 409 and "auth.max_keys" in answer.json()["error"]["message"]
    for key in fillers:  # room again for the tests after this one
        assert stack.admin.call("DELETE", f"/keys/{key['id']}").status == 200
    assert stack.admin.call("POST", "/keys", {"name": "one-too-many"}).status == 201


@pytest.mark.e2e
def test_no_secret_reaches_a_log_the_state_file_metrics_or_status(stack):
    key = create(stack, "secretive")
    wait_until(lambda: works(stack, key["secret"]), 5, "the new key in Envoy")
    with_key(stack, "sk-wg-made-up-for-the-grep")
    places = {path.name: path.read_text(errors="replace") for path in stack.tmp_path.glob("*.log")}
    places["state.json"] = (stack.plane.state_dir / "state.json").read_text()
    places["metrics"] = request("GET", stack.admin.url + "/metrics").text
    places["status"] = json.dumps(stack.admin.status())
    places["keys"] = stack.admin.call("GET", "/keys").text
    places["envoy config"] = request("GET", stack.envoy.admin + "/config_dump").text
    for secret in (key["secret"], "sk-wg-made-up-for-the-grep", ENGINE_KEY):
        leaked = [name for name, text in places.items() if secret in text and not (
            secret == ENGINE_KEY and name == "envoy config")]  # Envoy must hold the engines' key to send it
        assert not leaked, (secret[:8], leaked)


@pytest.mark.e2e
def test_the_cli_makes_lists_rotates_and_revokes_keys(stack):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "control_plane", "keys", *args, "--config", str(stack.config.path),
                               "--state-dir", str(stack.plane.state_dir)], capture_output=True, text=True, cwd=REPO,
                              timeout=30)

    made = run("create", "from-cli", "--model", MODEL)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("sk-wg-") and "shown only now" in made.stderr
    wait_until(lambda: works(stack, secret), 5, "the CLI's key in Envoy")
    listed = run("list")
    assert "from-cli" in listed.stdout and secret not in listed.stdout
    rotated = run("rotate", "from-cli", "--grace", "0")
    assert rotated.returncode == 0 and rotated.stdout.strip() != secret
    wait_until(lambda: with_key(stack, secret).status == 401, 5, "the old secret gone (no grace)")
    assert run("set", "from-cli", "--class", "batch").returncode == 0
    assert run("revoke", "from-cli").returncode == 0
    missing = run("revoke", "from-cli")
    assert missing.returncode == 1 and "no active key named 'from-cli'" in missing.stderr


@pytest.mark.e2e
def test_keys_are_kept_as_digests_and_survive_a_restart(stack):
    """Last of the tests on `stack`: the control plane it restarts is this test's, and stops with it."""
    key = create(stack, "durable")
    state = (stack.plane.state_dir / "state.json").read_text()
    assert key["secret"] not in state and digest(key["secret"]) in state
    stack.restart_plane()
    wait_until(lambda: works(stack, key["secret"]), 10, "the key after a restart")
    listed = {k["id"]: k for k in stack.admin.call("GET", "/keys").json()["data"]}
    assert listed[key["id"]]["name"] == "durable" and "secret" not in listed[key["id"]]


# --- without Envoy ----------------------------------------------------------------------------

def test_a_table_of_keys_changes_only_as_asked():
    table = KeyTable()
    key, secret = table.create("a", (), "interactive", now=100.0, max_keys=2)
    assert table.grants() == {hashlib.sha256(secret.encode()).hexdigest(): table.grants()[digest(secret)]}
    _, new = table.rotate(key.id, grace_s=10.0, now=200.0)
    assert set(table.grants()) == {digest(secret), digest(new)} and table.next_expiry() == 210.0
    assert not table.expire(now=209.0) and table.expire(now=210.0)
    assert set(table.grants()) == {digest(new)}
    table.create("b", ("m",), "batch", now=300.0, max_keys=2)
    with pytest.raises(KeyProblem, match="auth.max_keys"):
        table.create("c", (), "interactive", now=300.0, max_keys=2)
    table.revoke(key.id, now=400.0)
    assert len(table.grants()) == 1 and table.get(key.id).state == "revoked"
    table.create("a", (), "interactive", now=500.0, max_keys=2)  # a revoked key's name is free again
    assert KeyTable.from_state(json.loads(json.dumps(table.to_state()))) == table


OPEN_LISTENERS = [
    # (listen.address, auth, refused)
    ("0.0.0.0", {}, True),
    ("0.0.0.0", {"api_keys": "required"}, False),
    ("0.0.0.0", {"open_listener": True}, False),
    ("127.0.0.1", {}, False),
    ("::1", {}, False),
]


def test_keys_off_reads_as_written_in_yaml():
    import yaml

    raw = yaml.safe_load("listen: {address: 127.0.0.1}\nmodels: [m]\nauth: {api_keys: off}\n")
    assert parse_config(raw).auth.api_keys == "off"
    with pytest.raises(ConfigError, match="auth.api_keys"):
        parse_config(raw | {"auth": {"api_keys": "maybe"}})


@pytest.mark.parametrize("address,auth,refused", OPEN_LISTENERS)
def test_nothing_beyond_loopback_is_open_by_accident(address, auth, refused):
    raw = {"listen": {"address": address}, "models": ["m"], "auth": auth}
    if refused:
        with pytest.raises(ConfigError, match="auth.api_keys: off while listen.address"):
            parse_config(raw)
    else:
        parse_config(raw)


@pytest.mark.e2e
def test_envoy_hashes_secrets_of_every_length_as_the_state_file_keeps_them(tmp_path):
    """SHA-256 in the Lua filter against Python's: secrets around the 55/56/64-byte padding edges
    and over several blocks, written as digests into a state file before the gateway starts."""
    engine = start_engine(tmp_path, MODEL, "h1", time_scale=0.0001)[1]
    lengths = [1, 31, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 200, 256]
    chosen = {n: ("k" + "0123456789abcdef" * 17)[:n] for n in lengths}
    keys = [{"id": f"key-{n:012d}", "name": f"len-{n}", "created_at": 0.0,
             "secrets": [{"sha256": digest(secret), "expires_at": None}]} for n, secret in chosen.items()]
    # and 1200 more, so the table Envoy compiles spans several functions (builders/lua_source.py)
    keys += [{"id": f"key-f{n:011d}", "name": f"filler-{n}", "created_at": 0.0,
              "secrets": [{"sha256": digest(f"filler-{n}"), "expires_at": None}]} for n in range(1200)]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text(json.dumps({"version": 1, "keys": keys}))
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required"})
    for n, secret in chosen.items():
        assert with_key(stack, secret, model=MODEL).status == 200, n
        assert with_key(stack, secret[:-1] + "#", model=MODEL).status == 401, n
    assert with_key(stack, "k" * 257, model=MODEL).status == 401  # over the longest secret hashed
    assert with_key(stack, "filler-1199", model=MODEL).status == 200
