"""Load-aware routing end to end: engines' /metrics -> weights in Envoy -> where traffic goes."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from engines.common.audio import silent_wav
from harness.processes import (
    PYTHON,
    REPO,
    AdminClient,
    Envoy,
    GatewayStack,
    LoadGenerator,
    engine_names_in,
    free_port,
    multipart,
    request,
    start_engine,
    transcribe,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"


# On a 2-core machine running the whole suite a 200 ms scrape can time out for every engine at
# once, which (rightly) falls back to equal weights; these tests check the weights, not that.
ROUTING = {"scrape_interval_s": 0.5, "scrape_timeout_s": 0.45, "stale_after_s": 2.0}


def start_gateway(tmp_path, engines: dict[str, str]) -> tuple[Envoy, AdminClient]:
    stack = GatewayStack(tmp_path, MODEL, list(engines.values()), routing=ROUTING)
    return stack.envoy, stack.admin


def weights(envoy: Envoy, engines: dict[str, str]) -> dict[str, int]:
    hosts = envoy.endpoints()[f"model:{MODEL}"]
    return {name: int(hosts[url.removeprefix("http://")]["weight"]) for name, url in engines.items()}


def status(admin: AdminClient, engines: dict[str, str]) -> dict[str, dict]:
    by_url = {e["url"]: e for e in admin.status()["endpoints"]}
    return {name: by_url[url] for name, url in engines.items()}


def through_gateway(envoy: Envoy, names: list[str], count: int, concurrency: int = 1, seconds: float = 2.0):
    def one(_):
        response = transcribe(envoy.url, MODEL, seconds=seconds, extra=[("language", "en", None)])
        assert response.status == 200, response.text
        return response.json()["text"]

    with ThreadPoolExecutor(concurrency) as pool:
        return engine_names_in("".join(pool.map(one, range(count))), names)


def test_foreign_load_moves_traffic_to_the_other_engine(tmp_path):
    engines = {}
    for name in ("busy", "idle"):
        _, engines[name] = start_engine(tmp_path, MODEL, name, max_num_seqs=4, time_scale=2)
    envoy, admin = start_gateway(tmp_path, engines)
    wait_until(lambda: weights(envoy, engines) == {"busy": 128, "idle": 128}, 10, "equal weights at rest")

    # Load Envoy cannot see: clients sending straight to one engine.
    load = LoadGenerator(engines["busy"], MODEL, concurrency=10)
    try:
        wait_until(lambda: (w := weights(envoy, engines))["busy"] * 8 <= w["idle"], 5,
                   "the loaded engine's weight to drop in Envoy")
        report = status(admin, engines)
        assert report["busy"]["running"] == 4 and report["busy"]["waiting"] >= 1
        counts = through_gateway(envoy, ["busy", "idle"], 20)
        assert counts["idle"] >= 15, counts
    finally:
        statuses = load.stop()
    assert statuses and all(s == 200 for s in statuses)
    # Once the foreign load is gone, the weights even out again, to within the hysteresis band
    # (20%: a smaller difference is not pushed). Speeds measured under that batch are forgotten
    # once the engine has been idle for 5 s.
    wait_until(lambda: (w := weights(envoy, engines))["busy"] >= 0.8 * w["idle"] and w["idle"] == 128, 15,
               "weights to recover")


def test_the_faster_engine_gets_the_larger_share(tmp_path):
    engines = {}
    _, engines["fast"] = start_engine(tmp_path, MODEL, "fast", max_num_seqs=4, speed=3)
    _, engines["slow"] = start_engine(tmp_path, MODEL, "slow", max_num_seqs=4, speed=1)
    envoy, admin = start_gateway(tmp_path, engines)
    counts = through_gateway(envoy, ["fast", "slow"], 64, concurrency=6, seconds=30)
    assert counts["fast"] > 1.5 * counts["slow"], counts
    report = status(admin, engines)
    # Speed is measured from each engine's own counters, not configured.
    assert report["fast"]["seconds_per_request"] < report["slow"]["seconds_per_request"]


def test_long_uploads_go_to_the_engines_that_finish_them_soonest(tmp_path):
    engines = {}
    for name, speed in (("fast", 4), ("quick", 4), ("slow", 1)):
        _, engines[name] = start_engine(tmp_path, MODEL, name, max_num_seqs=8, speed=speed)
    envoy, admin = start_gateway(tmp_path, engines)
    names = list(engines)
    # Shorter clips through the gateway keep the engines' speeds measured. They are 30 s, one
    # full chunk like each of a long clip's: speed is seconds per engine request, so engines
    # are compared on like work.
    short = LoadGenerator(envoy.url, MODEL, concurrency=1, seconds=30)
    expected = {"fast": True, "quick": True, "slow": False}
    try:
        wait_until(lambda: {n: r["long_uploads"] for n, r in status(admin, engines).items()} == expected, 15,
                   "the two fast engines to be the ones for long uploads")
        # Two minutes of 16 kHz WAV: 3.8 MB, over the default 2 MB.
        long_counts = through_gateway(envoy, names, 8, concurrency=1, seconds=120)
        # The header that selects those engines is the gateway's: short clips that send it are
        # routed like any short clip, so some still reach the slow engine.
        body = multipart([("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("language", "en", None)])
        headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk", "x-whisper-long-upload": "1"}
        claimed = [request("POST", envoy.url + "/v1/audio/transcriptions", body, headers) for _ in range(40)]
        marks = {name: row["long_uploads"] for name, row in status(admin, engines).items()}
    finally:
        statuses = short.stop()
    assert long_counts["slow"] == 0 and long_counts["fast"] + long_counts["quick"] == 8 * 4, long_counts
    assert {r.status for r in claimed} == {200} and set(statuses) == {200}
    assert marks == expected  # the subset held all along: the claim was ignored
    assert engine_names_in("".join(r.json()["text"] for r in claimed), ["slow"])["slow"] >= 1


@pytest.mark.parametrize("fault", ["hang", "error"])
def test_failing_metrics_never_drop_an_engine(tmp_path, fault):
    engines = {}
    for name in ("flaky", "steady"):
        _, engines[name] = start_engine(tmp_path, MODEL, name, max_num_seqs=4, time_scale=2)
    envoy, admin = start_gateway(tmp_path, engines)
    # The flaky engine is busy when its metrics stop: its last weight was low.
    load = LoadGenerator(engines["flaky"], MODEL, concurrency=10)
    try:
        wait_until(lambda: (w := weights(envoy, engines))["flaky"] * 4 <= w["steady"], 5, "a low weight")
        assert request("POST", engines["flaky"] + "/_sim/faults", json.dumps({"metrics": fault}).encode(),
                       {"Content-Type": "application/json"}).status == 200
    finally:
        load.stop()
    wait_until(lambda: status(admin, engines)["flaky"]["health"] == "stale", 5, "its metrics to be stale")
    report = status(admin, engines)
    assert report["flaky"]["scrape_error"] in ("timeout", "HTTP 500")
    # A hung scrape does not hold up the others.
    assert report["steady"]["health"] == "ok" and report["steady"]["scrape_age_s"] < 1.0
    # The rule: old news is not trusted to have improved (no better than the fresh median),
    # and the engine stays in rotation: every request succeeds, some on it.
    current = weights(envoy, engines)
    assert 1 <= current["flaky"] < current["steady"]
    counts = through_gateway(envoy, ["flaky", "steady"], 40, concurrency=4)
    assert sum(counts.values()) == 40 and counts["flaky"] >= 1, counts


def test_status_command_shows_load_and_weights(tmp_path):
    engines = {}
    _, engines["e1"] = start_engine(tmp_path, MODEL, "e1")
    envoy, admin = start_gateway(tmp_path, engines)
    wait_until(lambda: status(admin, engines)["e1"]["health"] == "ok", 5, "a first scrape")
    assert transcribe(envoy.url, MODEL, seconds=12.0).status == 200
    wait_until(lambda: admin.status()["models"][0]["requests"] == 1, 10, "the request metered")
    cli = [PYTHON, "-m", "control_plane", "status", "--url", admin.url, "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "URL", "MODEL", "STATE", "HEALTH", "RUNNING", "WAITING", "KV", "WEIGHT", "S/REQ",
                                "AUDIO-S", "AUDIO-S/S", "FAILED", "AGE"]
    row = lines[1].split()
    assert row[1:9] == [engines["e1"], MODEL, "active", "ok", "0", "0", "0", "128"]
    models = lines.index(next(line for line in lines if line.startswith("MODEL ")))
    assert lines[models].split()[:5] == ["MODEL", "REQUESTS", "RECEIVED-S", "SERVED-S", "FAILED-S"]
    assert lines[models + 1].split()[:5] == [MODEL, "1", "12", "12", "0"]
    assert any(line.startswith("envoy envoy ") for line in lines)
    as_json = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert json.loads(as_json.stdout)["endpoints"][0]["weight"] == 128
    down = subprocess.run(cli[:5] + [f"http://127.0.0.1:{free_port()}"] + cli[6:], capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert down.returncode == 1 and "cannot reach the control plane" in down.stderr
    no_token = subprocess.run(cli[:7] + [str(tmp_path / "elsewhere")], capture_output=True, text=True, timeout=30,
                              cwd=REPO)
    assert no_token.returncode == 1 and "HTTP 401" in no_token.stderr
