"""Quotas shared by several Envoys: how much audio a key gets through against its budget.

A simulated engine behind a real control plane and one or two real Envoys on one port (the
kernel splits connections between them). One API key whose plan allows QUOTA audio-seconds a
minute. Its buckets start full, so the client first spends them (clips until eight in a row
are refused), then offers twice the quota, as clips of CLIP_S sent at a fixed rate, each on a
new connection, for --seconds: the steady state, where the plan allows QUOTA x T / 60. The
report gives what was admitted against that. The second two-Envoy run restarts the control
plane halfway: the Envoys keep their buckets and their share.

    .venv/bin/python -m bench.quotas [--seconds 60]

Writes bench/results/quotas.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import describe_machine
from harness.processes import STARTED, Envoy, GatewayStack, multipart, request, silent_wav, start_engine, wait_until

MODEL = "whisper-large-v3-turbo"
RESULTS = Path(__file__).parent / "results"
QUOTA = 120  # audio-seconds a minute
CLIP_S = 2.0
OFFERED = 2.0  # times the quota
LIMIT = 1.05  # the target: admitted at most this times what the plan allows


def run(log_dir: Path, envoys: int, seconds: float, restart: bool) -> dict:
    engine = start_engine(log_dir, MODEL, f"quota-{envoys}", time_scale=0.0001)[1]
    run_dir = Path(tempfile.mkdtemp(prefix=f"envoys-{envoys}-", dir=log_dir))
    stack = GatewayStack(run_dir, MODEL, [engine], auth={"api_keys": "required", "plans": {
        "bench": {"requests_per_minute": 100_000, "audio_seconds_per_minute": QUOTA}}})
    extra = [Envoy(run_dir, stack.raw, name=f"envoy-{i + 2}") for i in range(envoys - 1)]
    for envoy in extra:
        envoy.wait_serving()
    wait_until(lambda: len(stack.admin.status()["envoys"]) == envoys, 10, "every Envoy connected")
    secret = stack.admin.call("POST", "/keys", {"name": "bench", "plan": "bench"}).json()["secret"]
    body = multipart([("model", MODEL, None), ("file", silent_wav(CLIP_S), "clip.wav")])
    headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk", "Authorization": f"Bearer {secret}"}
    interval = CLIP_S / (OFFERED * QUOTA / 60)
    refused_in_a_row = 0
    while refused_in_a_row < 8:  # the buckets' first fill, spent
        status = request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, headers, timeout=30).status
        refused_in_a_row = refused_in_a_row + 1 if status == 429 else 0
    admitted: list[float] = []  # when each admitted clip was sent
    refused = failed = 0
    lock = threading.Lock()

    def one(at: float) -> None:
        nonlocal refused, failed
        status = request("POST", stack.envoy.url + "/v1/audio/transcriptions", body, headers, timeout=30).status
        with lock:
            if status == 200:
                admitted.append(at)
            elif status == 429:
                refused += 1
            else:
                failed += 1

    start = time.monotonic()
    threads, sent, restarted = [], 0, False
    while (now := time.monotonic() - start) < seconds:
        if restart and not restarted and now >= seconds / 2:
            threading.Thread(target=stack.restart_plane, daemon=True).start()
            restarted = True
        thread = threading.Thread(target=one, args=(now,))
        thread.start()
        threads.append(thread)
        sent += 1
        time.sleep(max(0.0, start + sent * interval - time.monotonic()))
    for thread in threads:
        thread.join(60)
    for envoy in extra:
        envoy.stop()
    stack.stop()
    allowed = QUOTA * seconds / 60
    return {"envoys": envoys, "control_plane_restarted": restart, "seconds": seconds,
            "offered_audio_s": round(sent * CLIP_S, 1), "admitted_audio_s": round(len(admitted) * CLIP_S, 1),
            "allowed_audio_s": round(allowed, 1), "vs_allowed": round(len(admitted) * CLIP_S / allowed, 3),
            "refused": refused, "failed": failed}


def markdown(report: dict) -> str:
    lines = [f"Quotas shared by Envoys, {report['date']}, commit {report['commit']}: a key allowed {QUOTA} "
             f"audio-seconds a minute, its buckets spent first, then offered {OFFERED:g}x that as {CLIP_S:g} s clips "
             f"for {report['seconds']:g} s; audio-seconds.", "",
             "| Envoys | control plane restarted | offered | admitted | the plan allows | admitted / allowed | "
             "refused | failed |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['envoys']} | {'yes' if r['control_plane_restarted'] else 'no'} | {r['offered_audio_s']:g} | "
                     f"{r['admitted_audio_s']:g} | {r['allowed_audio_s']:g} | {r['vs_allowed']:.3f} | "
                     f"{r['refused']} | {r['failed']} |")
    worst = max(r["vs_allowed"] for r in report["runs"])
    lines += ["", f"Target: admitted at most {LIMIT}x what the plan allows: {worst:.3f}x, "
              f"{'met' if worst <= LIMIT else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    machine = describe_machine()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-quotas-"))
    report = {"date": machine["date"], "commit": machine["git_commit"], "machine": machine, "seconds": args.seconds,
              "runs": []}
    try:
        for envoys, restart in ((1, False), (2, False), (2, True)):
            report["runs"].append(run(log_dir, envoys, args.seconds, restart))
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
