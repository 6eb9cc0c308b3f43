"""Guessing API keys: a client address over auth.bad_keys_per_address wrong keys gets 429.

Real processes: the control plane, Envoy with one worker (--concurrency 1; each worker counts
on its own, so the threshold is exact only with one), a simulated engine. Each test sends from
its own loopback address (127.0.0.0/8 is all loopback on Linux), so their windows never meet.
"""

from __future__ import annotations

import http.client
import signal
import time

import pytest
import yaml

from control_plane.bootstrap import read_lua_filter
from control_plane.builders.lua_source import filter_source
from control_plane.builders.routes import lua_context
from control_plane.config import parse_config
from control_plane.supervisor import find_envoy
from control_plane.tenants.keys import Access
from harness.processes import (GatewayStack, Process, Response, free_port, multipart, request, silent_wav,
                               start_engine, wait_until)
from tests.test_keys import create

MODEL = "whisper-large-v3-turbo"
THRESHOLD, WINDOW_S = 5, 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-keys")
    engine = start_engine(tmp_path, MODEL, "b1", time_scale=0.0001)
    gateway = GatewayStack(tmp_path, MODEL, [engine[1]], workers=1,
                           auth={"api_keys": "required", "bad_keys_per_address": THRESHOLD,
                                 "bad_key_window_s": WINDOW_S})
    yield gateway
    gateway.stop()
    engine[0].stop()


def send(stack, source: str, secret: str | None) -> Response:
    """A clip sent from the loopback address `source`, with `secret` as its key (None: no key)."""
    headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    body = multipart([("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")])
    connection = http.client.HTTPConnection("127.0.0.1", stack.raw["listen"]["port"], timeout=30,
                                            source_address=(source, 0))
    try:
        connection.request("POST", "/v1/audio/transcriptions", body, headers)
        answer = connection.getresponse()
        return Response(answer.status, answer.read(), {k.lower(): v for k, v in answer.getheaders()})
    finally:
        connection.close()


def engine_requests(stack) -> int:
    return stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total")


def assert_refused_for_guessing(answer: Response) -> int:
    """The 429's shape; returns its Retry-After."""
    assert answer.status == 429, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": {"message": answer.json()["error"]["message"], "type": "bad_api_keys",
                                       "param": None, "code": "too_many_bad_keys"}}
    retry_after = int(answer.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    assert f"wait {retry_after} s" in answer.json()["error"]["message"]
    return retry_after


def test_the_lua_filter_is_told_the_threshold_and_window():
    config = parse_config({"models": [{"name": MODEL}], "backends": [],
                           "auth": {"api_keys": "required", "bad_keys_per_address": 7, "bad_key_window_s": 2.5}})
    context = lua_context(config, None, Access())
    assert context["bad_keys_per_address"] == 7 and context["bad_key_window_s"] == 2.5
    assert '["bad_key_window_s"] = 2.5, ["bad_keys_per_address"] = 7' in filter_source("", context, Access())
    defaults = lua_context(parse_config({"models": [{"name": MODEL}], "backends": []}), None, Access())
    assert (defaults["bad_keys_per_address"], defaults["bad_key_window_s"]) == (20, 10.0)


@pytest.mark.e2e
def test_wrong_keys_past_the_threshold_get_429_and_reach_no_engine(stack):
    source = "127.0.0.11"
    before = engine_requests(stack)
    statuses = [send(stack, source, f"sk-wg-guess-{i}").status for i in range(THRESHOLD)]
    assert statuses == [401] * THRESHOLD
    for i in range(3):
        assert_refused_for_guessing(send(stack, source, f"sk-wg-guess-more-{i}"))
    assert_refused_for_guessing(send(stack, source, None))  # over: no key at all gets 429 too
    assert send(stack, "127.0.0.12", "sk-wg-guess").status == 401  # another address has its own count
    assert engine_requests(stack) == before


@pytest.mark.e2e
def test_a_valid_key_from_the_guessing_address_still_gets_through(stack):
    # The key first: a new key is a new route configuration, whose Lua starts with no counts.
    secret = create(stack, "office")["secret"]
    wait_until(lambda: send(stack, "127.0.0.20", secret).status == 200, 10, "the new key in Envoy")
    source = "127.0.0.21"
    for i in range(THRESHOLD):
        assert send(stack, source, f"sk-wg-guess-{i}").status == 401
    assert_refused_for_guessing(send(stack, source, "sk-wg-guess-again"))
    before = engine_requests(stack)
    answer = send(stack, source, secret)
    assert answer.status == 200, answer.text
    assert engine_requests(stack) == before + 1
    assert_refused_for_guessing(send(stack, source, "sk-wg-guess-still"))  # and it cleared nothing


@pytest.mark.e2e
def test_missing_keys_never_count_towards_the_threshold(stack):
    source = "127.0.0.31"
    assert [send(stack, source, None).status for _ in range(2 * THRESHOLD)] == [401] * (2 * THRESHOLD)
    assert [send(stack, source, f"sk-wg-guess-{i}").status for i in range(THRESHOLD)] == [401] * THRESHOLD


@pytest.mark.e2e
def test_after_the_window_wrong_keys_get_401_again(stack):
    source = "127.0.0.41"
    for i in range(THRESHOLD):
        assert send(stack, source, f"sk-wg-guess-{i}").status == 401
    refused_at = time.monotonic()
    retry_after = assert_refused_for_guessing(send(stack, source, "sk-wg-guess-over"))
    wait_until(lambda: send(stack, source, "sk-wg-guess-later").status == 401, retry_after + 2,
               "the address's window to end", interval=0.05)
    assert time.monotonic() - refused_at <= retry_after + 1  # Retry-After told the truth
    # A new window: the polling's last guess was its first.
    assert [send(stack, source, f"sk-wg-guess-{i}").status for i in range(THRESHOLD - 1)] == [401] * (THRESHOLD - 1)
    assert_refused_for_guessing(send(stack, source, "sk-wg-guess-over"))


@pytest.mark.e2e
def test_a_threshold_of_zero_never_refuses(stack):
    before = stack.envoy.config_versions()["RDS"]
    raw = stack.raw | {"auth": stack.raw["auth"] | {"bad_keys_per_address": 0}}
    stack.config.write(raw)
    stack.plane.signal(signal.SIGHUP)
    try:
        wait_until(lambda: stack.envoy.config_versions()["RDS"] != before, 10, "the new routes in Envoy")
        source = "127.0.0.51"
        count = 4 * THRESHOLD
        assert [send(stack, source, f"sk-wg-guess-{i}").status for i in range(count)] == [401] * count
    finally:
        stack.config.write(stack.raw)
        stack.plane.signal(signal.SIGHUP)


ADDRESSES = {  # Envoy's downstreamRemoteAddress -> what its wrong keys count against
    "127.0.0.1:5678": "127.0.0.1",
    "[::1]:5678": "0:0:0:0::/64",
    "[2001:db8::1]:443": "2001:db8:0:0::/64",
    "[2001:DB8:1:2:3:4:5:6]:1": "2001:db8:1:2::/64",
    "[2001:db8:1:2::9]:1": "2001:db8:1:2::/64",
    "[2001:db8:1::2:3]:1": "2001:db8:1:0::/64",
    "[fe80::1%eth0]:1": "fe80:0:0:0::/64",
    "[::ffff:10.1.2.3]:80": "10.1.2.3",
}


@pytest.mark.e2e
def test_addresses_count_without_their_port_and_ipv6_by_its_64(tmp_path):
    """envoy/api_keys.lua's address_key, run by a bare Envoy's Lua."""
    port = free_port()
    source = filter_source(read_lua_filter(("openai_errors", "api_keys")), {}, Access()) + """
function envoy_on_request(h)
  h:respond({[":status"] = "200"}, api_keys.address_key(h:headers():get("x-address")))
end
"""
    bootstrap = {"static_resources": {"listeners": [{
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "t",
                "route_config": {"virtual_hosts": [{"name": "t", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
                "http_filters": [
                    {"name": "envoy.filters.http.lua", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                        "default_source_code": {"inline_string": source}}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]}}
    path = tmp_path / "bare-envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy = Process("bare-envoy", [find_envoy(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                                   "--log-level", "warn"], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: envoy.alive() and request("GET", url, headers={"x-address": "1.2.3.4:5"}).status == 200,
                   20, "the bare Envoy to serve")
        seen = {address: request("GET", url, headers={"x-address": address}).text for address in ADDRESSES}
        assert seen == ADDRESSES
    finally:
        envoy.stop()
