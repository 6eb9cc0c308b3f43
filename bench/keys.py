"""Key changes at scale: how long making a key takes, end to end, as the table grows.

A real control plane and Envoy with `auth.api_keys: required`; keys made one at a time through
the admin API. Each answer comes after the change is saved and every Envoy has applied the
routes that carry the whole key table (control_plane/builders/lua_source.py), so its time is
what an operator waits and how long until a new key works.

    .venv/bin/python -m bench.keys [--keys 2000]

Writes bench/results/keys.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.machine import describe_machine
from harness.processes import STARTED, GatewayStack, start_engine

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2000)
    args = parser.parse_args()
    machine = describe_machine()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    marks = {n for n in (1, 10, 100, 500, 1000, 2000, 5000, 10000) if n <= args.keys} | {args.keys}
    timings: dict[int, float] = {}
    try:
        engine = start_engine(log_dir, "whisper", "keys", time_scale=0.0001)[1]
        stack = GatewayStack(log_dir, "whisper", [engine], auth={"api_keys": "required", "max_keys": args.keys})
        start = time.monotonic()
        for n in range(1, args.keys + 1):
            began = time.monotonic()
            answer = stack.admin.call("POST", "/keys", {"name": f"bench-{n}"})
            assert answer.status == 201, answer.text
            if n in marks:
                timings[n] = round((time.monotonic() - began) * 1000, 1)
                print(f"key {n}: {timings[n]} ms", flush=True)
        total = round(time.monotonic() - start, 1)
    finally:
        for process in reversed(STARTED):
            process.stop()
    report = {"date": machine["date"], "commit": machine["git_commit"], "machine": machine,
              "create_ms_at": timings, "total_s": total}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keys.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"create_ms_at": timings, "total_s": total}))


if __name__ == "__main__":
    main()
