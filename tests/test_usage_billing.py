"""Usage for billing through the admin API and the CLI: per day, key and model, kept in the state
dir across control-plane restarts (even kill -9, once written: every second)."""

from __future__ import annotations

import csv
import io
import subprocess
from datetime import datetime, timezone

import pytest

from harness.processes import PYTHON, GatewayStack, start_engine, transcribe, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"


def usage(stack, **query) -> list[dict]:
    answer = stack.admin.call("GET", "/usage" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""))
    assert answer.status == 200, answer.text
    return answer.json()["data"]


def served(stack) -> tuple[int, float]:
    rows = usage(stack)
    return sum(r["requests"] for r in rows), round(sum(r["audio_served_s"] for r in rows), 3)


def test_usage_survives_a_killed_control_plane_and_reads_as_json_csv_and_from_the_cli(tmp_path):
    _, engine = start_engine(tmp_path, MODEL, "e1", time_scale=0.0001)
    stack = GatewayStack(tmp_path, MODEL, [engine])
    try:
        for _ in range(3):
            assert transcribe(stack.envoy.url, MODEL, seconds=2.0).status == 200
        wait_until(lambda: served(stack) == (3, 6.0), 10, "three requests metered")
        today = datetime.now(timezone.utc).date().isoformat()
        record = tmp_path / "state" / "usage" / today
        wait_until(lambda: any(record.glob("*.json")), 5, "the day's record written")
        stack.restart_plane(kill=True)
        assert served(stack) == (3, 6.0)  # what the killed plane had written
        assert transcribe(stack.envoy.url, MODEL, seconds=2.0).status == 200
        wait_until(lambda: served(stack) == (4, 8.0), 10, "the new plane's request added")
        rows = usage(stack, **{"from": today, "to": today, "format": "json"})
        assert [(r["day"], r["key"], r["model"]) for r in rows] == [(today, "", MODEL)]
        text = stack.admin.call("GET", f"/usage?from={today}&format=csv").text
        parsed = list(csv.DictReader(io.StringIO(text)))
        assert parsed[0]["requests"] == "4" and float(parsed[0]["audio_served_s"]) == 8.0
        for bad in ("from=2026-13-01", "from=20261207", "to=2020-01-01&from=2021-01-01", "format=xml", "week=1"):
            answer = stack.admin.call("GET", "/usage?" + bad)
            assert answer.status == 400 and answer.json()["error"]["param"], (bad, answer.text)
        cli = subprocess.run([PYTHON, "-m", "control_plane", "keys", "usage", "--since", today, "--csv",
                              "--config", str(stack.config.path), "--state-dir", str(stack.plane.state_dir)],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.splitlines()[1].startswith(f"{today},,{MODEL},4,")
    finally:
        stack.stop()
