"""Key changes at scale: how long making a key takes, end to end, as the table grows.

A real control plane and Envoy with `auth.api_keys: required`; keys made one at a time through
the admin API. Each answer comes after the change is saved and every Envoy has applied the
routes that carry the whole key table (control_plane/builders/lua_source.py), so its time is
what an operator waits and how long until a new key works.

    .venv/bin/python -m bench.keys [--keys 2000]
    .venv/bin/python -m bench.keys --seed 10000 --keys 20   # 10,000 keys in the state file first

Writes bench/results/keys.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.machine import describe_machine
from control_plane.fleet.registry import Registry
from control_plane.fleet.local_store import StateStore
from control_plane.tenants.keys import KeyTable
from engines.common.audio import silent_wav
from harness.processes import STARTED, GatewayStack, multipart, request, start_engine

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2000, help="keys made one at a time through the admin API")
    parser.add_argument("--seed", type=int, default=0, help="keys in the state file before the control plane starts")
    args = parser.parse_args()
    machine = describe_machine()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    marks = {n for n in (1, 10, 100, 500, 1000, 2000, 5000, 10000) if n <= args.keys} | {args.keys}
    timings: dict[int, float] = {}
    seeded = {}
    try:
        if args.seed:
            seeded = seed_state(log_dir / "state", args.seed)
        engine = start_engine(log_dir, "whisper", "keys", time_scale=0.0001)[1]
        began = time.monotonic()
        stack = GatewayStack(log_dir, "whisper", [engine],
                             auth={"api_keys": "required", "max_keys": args.keys + args.seed})
        seeded["start_to_serving_s"] = round(time.monotonic() - began, 2)
        if args.seed:
            secret = seeded.pop("secret")
            answer = request("POST", stack.envoy.url + "/v1/audio/transcriptions", body=FORM,
                             headers={"Content-Type": FORM_TYPE, "Authorization": f"Bearer {secret}"})
            seeded["a_seeded_key_answers"] = answer.status
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
              "create_ms_at": timings, "total_s": total, "seeded": args.seed} | seeded
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keys.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"create_ms_at": timings, "total_s": total, "seeded": args.seed} | seeded))


FORM_TYPE = "multipart/form-data; boundary=wgboundary7MA4YWxk"
FORM = multipart([("model", "whisper", None), ("file", silent_wav(1.0), "clip.wav")])


def seed_state(state_dir: Path, count: int) -> dict:
    """A state file holding `count` keys, as the control plane saves them; one secret back."""
    table, secret = KeyTable(), None
    for n in range(count):
        _, made = table.create(f"seeded-{n}", (), "interactive", time.time(), count)
        secret = secret or made
    store = StateStore(state_dir)
    store.save(Registry.empty().to_json() | {"keys": table.to_state()})
    return {"state_file_bytes": store.path.stat().st_size, "secret": secret}


if __name__ == "__main__":
    main()
