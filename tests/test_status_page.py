"""The status page as a person sees it: loaded in headless Chromium from a running control plane."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from harness.processes import GatewayStack, start_engine, transcribe, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is not installed (make test installs it)")


class Rows(HTMLParser):
    """The engines table's rows (data-url -> cell texts), the models table's (data-model -> ...)
    and the keys table's (data-key -> ...)."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._url = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and ("data-url" in attrs or "data-model" in attrs or "data-key" in attrs):
            self._url = attrs.get("data-url") or (
                "model:" + attrs["data-model"] if "data-model" in attrs else "key:" + attrs["data-key"])
            self.rows[self._url] = []
        elif tag == "td" and self._url:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[self._url].append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self._url = None


def page_rows(url: str) -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 "--virtual-time-budget=4000", "--dump-dom", url],
                                capture_output=True, text=True, timeout=60)
    parser = Rows()
    parser.feed(result.stdout)
    return parser.rows


def screenshot(url: str, path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000",
                        "--window-size=1400,520", f"--screenshot={path}", url], capture_output=True, timeout=60)


def test_status_page_shows_what_the_api_says_and_follows_a_drain(tmp_path):
    engines = [start_engine(tmp_path, MODEL, name)[1] for name in ("e1", "e2")]
    gateway = GatewayStack(tmp_path, MODEL, engines)
    api = gateway.admin
    wait_until(lambda: all(e["health"] == "ok" for e in api.status()["endpoints"]), 5, "fresh metrics")
    url = f"{api.url}/ui#token={api.token}"

    assert transcribe(gateway.envoy.url, MODEL, seconds=7.5).status == 200
    wait_until(lambda: api.status()["models"][0]["requests"] == 1, 10, "the request metered")
    rows = page_rows(url)
    # columns: model, requests, audio received, served, failed, estimated, backlog, drain rate, wait
    assert rows.pop(f"model:{MODEL}")[:5] == [MODEL, "1", "7.5 s", "7.5 s", "0.0 s"]
    # keys are off here: the request is metered under no key
    assert rows.pop("key:") == ["-", "(no key)", MODEL, "1", "7.5 s", "7.5 s", "0.0 s"]
    expected = {e["url"]: e for e in api.status()["endpoints"]}
    assert set(rows) == set(expected)
    for engine_url, cells in rows.items():
        # columns: backend, url, model, source, state, metrics, running, waiting, kv, weight, s/req, scraped
        assert cells[0] == expected[engine_url]["id"] and cells[2] == MODEL
        assert cells[4] == "active" and cells[5] == "ok"
        assert int(cells[9]) == expected[engine_url]["weight"]

    drained = api.backends()[engines[1]]["id"]
    assert api.call("POST", f"/backends/{drained}/drain", {"timeout_s": 30}).status == 202
    wait_until(lambda: api.backends()[engines[1]]["state"] == "drained", 10, "the drain")
    rows = page_rows(url)
    assert rows[engines[1]][4] == "drained" and rows[engines[0]][4] == "active"
    assert f"model:{MODEL}" in rows

    # Without a token the page asks for one and shows no data.
    assert page_rows(f"{api.url}/ui") == {}


def test_page_is_served_without_the_token_but_data_is_not(tmp_path):
    from harness.processes import request

    engine = start_engine(tmp_path, MODEL, "e1")[1]
    gateway = GatewayStack(tmp_path, MODEL, [engine])
    page = request("GET", gateway.admin.url + "/ui")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert re.search(r'fetch\("/status"', page.text)
    assert request("GET", gateway.admin.url + "/status").status == 401
