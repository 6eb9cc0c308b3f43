"""One budget per key across Envoys: how much audio a key gets through against its plan.

A simulated engine behind a real control plane and 1, 2 or 8 real Envoys (one worker each) on
one port: the kernel splits connections between them. One API key whose plan allows QUOTA
audio-seconds a minute. A client offers twice the quota as clips of CLIP_S at a fixed rate,
either `spread` (a new connection each, so every Envoy gets some) or `one` (one keep-alive
connection, so one Envoy gets all). Its buckets start full, so the client first spends them
(clips until eight in a row are refused), then offers the load for --seconds, of which the
first WARMUP_S are not counted: the control plane learns where the key's traffic arrives, and
repays what the Envoys' buckets admitted beyond the key's exact budget while their charges moved
(or shares out what they left), which takes up to a minute. Then the steady state, where the
plan allows QUOTA x T / 60 over the T counted. The report gives
what was admitted against that. A last
two-Envoy run restarts the control plane halfway. Each run also sends, under a key of its own,
one upload of a whole minute's budget, which must pass however many Envoys there are.

    .venv/bin/python -m bench.quotas [--seconds 150]

Writes bench/results/quotas.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import describe_machine
from harness.processes import STARTED, Envoy, GatewayStack, multipart, silent_wav, start_engine, wait_until

MODEL = "whisper-large-v3-turbo"
RESULTS = Path(__file__).parent / "results"
QUOTA = 120  # audio-seconds a minute
CLIP_S = 2.0
OFFERED = 2.0  # times the quota
TARGET = (0.95, 1.05)  # admitted within these times what the plan allows
WARMUP_S = 60.0
BOUNDARY = "wgboundary7MA4YWxk"


class Client:
    """Sends uploads one after another: on one keep-alive connection, or a new one each."""

    def __init__(self, port: int, secret: str, keep_alive: bool):
        self.port, self.keep_alive, self.connection = port, keep_alive, None
        self.headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Authorization": f"Bearer {secret}"}

    def send(self, body: bytes) -> int:
        if self.connection is None or not self.keep_alive:
            if self.connection is not None:
                self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            self.connection.request("POST", "/v1/audio/transcriptions", body, self.headers)
            answer = self.connection.getresponse()
            answer.read()
            return answer.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = None
            return 0


def run(log_dir: Path, envoys: int, spread: bool, seconds: float, restart: bool) -> dict:
    engine = start_engine(log_dir, MODEL, f"quota-{envoys}-{spread}-{restart}", time_scale=0.0001)[1]
    run_dir = Path(tempfile.mkdtemp(prefix=f"envoys-{envoys}-", dir=log_dir))
    stack = GatewayStack(run_dir, MODEL, [engine], workers=1, auth={"api_keys": "required", "plans": {
        "bench": {"requests_per_minute": 100_000, "audio_seconds_per_minute": QUOTA}}})
    extra = [Envoy(run_dir, stack.raw, name=f"envoy-{i + 2}", workers=1) for i in range(envoys - 1)]
    for envoy in extra:
        envoy.wait_serving()
    wait_until(lambda: len(stack.admin.status()["envoys"]) == envoys, 20, "every Envoy connected")
    port = int(stack.envoy.url.rsplit(":", 1)[1])
    whole = stack.admin.call("POST", "/keys", {"name": "whole-minute", "plan": "bench"}).json()["secret"]
    whole_minute = Client(port, whole, False).send(multipart([("model", MODEL, None),
                                                              ("file", silent_wav(QUOTA), "long.wav")]))
    secret = stack.admin.call("POST", "/keys", {"name": "bench", "plan": "bench"}).json()["secret"]
    client = Client(port, secret, keep_alive=not spread)
    body = multipart([("model", MODEL, None), ("file", silent_wav(CLIP_S), "clip.wav")])
    interval = CLIP_S / (OFFERED * QUOTA / 60)
    refused_in_a_row = 0
    while refused_in_a_row < 8:  # the buckets' first fill, spent
        refused_in_a_row = refused_in_a_row + 1 if client.send(body) == 429 else 0
    admitted = refused = failed = sent = 0
    start, restarted = time.monotonic(), False
    counted_from = start + WARMUP_S
    while time.monotonic() - start < seconds:
        if restart and not restarted and time.monotonic() - start >= seconds / 2:
            threading.Thread(target=stack.restart_plane, daemon=True).start()
            restarted = True
        at = time.monotonic()
        status = client.send(body)
        if at >= counted_from:
            admitted, refused = admitted + (status == 200), refused + (status == 429)
            failed += status not in (200, 429)
            sent += 1
        time.sleep(max(0.0, start + (int((time.monotonic() - start) / interval) + 1) * interval - time.monotonic()))
    elapsed = time.monotonic() - counted_from
    for envoy in extra:
        envoy.stop()
    stack.stop()
    allowed = QUOTA * elapsed / 60
    return {"envoys": envoys, "traffic": "spread" if spread else "one connection", "control_plane_restarted": restart,
            "seconds": round(elapsed, 1), "whole_minute_upload": whole_minute,
            "offered_audio_s": round(sent * CLIP_S, 1), "admitted_audio_s": round(admitted * CLIP_S, 1),
            "allowed_audio_s": round(allowed, 1), "vs_allowed": round(admitted * CLIP_S / allowed, 3),
            "refused": refused, "failed": failed}


def markdown(report: dict) -> str:
    lines = [f"One budget across Envoys, {report['date']}, commit {report['commit']}: a key allowed {QUOTA} "
             f"audio-seconds a minute, its buckets spent first, then offered {OFFERED:g}x that as {CLIP_S:g} s clips "
             f"for {report['seconds']:g} s, the first {WARMUP_S:g} s not counted; audio-seconds.", "",
             "| Envoys | traffic | control plane restarted | a whole minute's upload | offered | admitted | "
             "the plan allows | admitted / allowed | refused | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['envoys']} | {r['traffic']} | {'yes' if r['control_plane_restarted'] else 'no'} | "
                     f"{r['whole_minute_upload']} | {r['offered_audio_s']:g} | {r['admitted_audio_s']:g} | "
                     f"{r['allowed_audio_s']:g} | {r['vs_allowed']:.3f} | {r['refused']} | {r['failed']} |")
    low, high = min(r["vs_allowed"] for r in report["runs"]), max(r["vs_allowed"] for r in report["runs"])
    whole = all(r["whole_minute_upload"] == 200 for r in report["runs"])
    met = TARGET[0] <= low and high <= TARGET[1] and whole
    lines += ["", f"Target: admitted within {TARGET[0]}-{TARGET[1]}x what the plan allows in every run, and a whole "
              f"minute's upload admitted: {low:.3f}-{high:.3f}x, whole-minute uploads "
              f"{'all admitted' if whole else 'NOT all admitted'}: {'met' if met else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--only", default="", help="runs to make, e.g. '8:spread,2:restart' (default: all)")
    args = parser.parse_args()
    machine = describe_machine()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-quotas-"))
    report = {"date": machine["date"], "commit": machine["git_commit"], "machine": machine, "seconds": args.seconds,
              "runs": []}
    try:
        runs = [(envoys, spread, False) for envoys in (1, 2, 8) for spread in (True, False)] + [(2, True, True)]
        if args.only:
            names = [f"{e}:{'restart' if r else 'spread' if s else 'one'}" for e, s, r in runs]
            runs = [run for run, name in zip(runs, names) if name in args.only.split(",")]
        for envoys, spread, restart in runs:
            report["runs"].append(run(log_dir, envoys, spread, args.seconds, restart))
            print(json.dumps(report["runs"][-1]), flush=True)
    finally:
        for process in reversed(STARTED):
            process.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quotas.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / "quotas.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
