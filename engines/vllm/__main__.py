"""`python -m engines.vllm`: a real vLLM engine, with the arguments compose gives GPU engines.

The gateway passes the served name (`--model`, as for its other engines) and the weights
(`--model-path`, a Hugging Face id or a folder). `--cpu` adds what vLLM's CPU build needs for
the tiny test checkpoint. The process becomes vLLM, so signals reach it directly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from engines.common.runner import add_tls_arguments


def vllm_arguments(model_path: str, served_name: str, host: str, port: int, max_num_seqs: int) -> list[str]:
    """What every vLLM engine of the gateway gets (compose.yaml's `engine` service says the same)."""
    return ["--model", model_path, "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--max-num-seqs", str(max_num_seqs)]


# vLLM's CPU build serving the tiny checkpoint: its context is Whisper's 448 tokens, and the
# encoder's 1500 tokens must fit one batch.
CPU_ARGUMENTS = ["--max-model-len", "448", "--dtype", "float32", "--enforce-eager", "--max-num-batched-tokens", "2048"]


def find_vllm() -> str:
    home = Path(os.environ.get("WHISPER_GATEWAY_VLLM_HOME", Path.home() / ".cache" / "whisper-gateway"))
    for candidate in (shutil.which("vllm"), home / "vllm-venv" / "bin" / "vllm"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("vllm not found: install vllm (GPU) or run engines/vllm/setup_cpu.sh (CPU)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.vllm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--model-path", required=True, help="weights: a Hugging Face id or a folder")
    parser.add_argument("--name", default=None, help="engine name (logs only)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="vLLM's CPU build with the tiny test checkpoint")
    parser.add_argument("--api-key", default=None, help="vLLM's own: /v1 paths need this bearer key")
    add_tls_arguments(parser)  # vLLM's own flags, passed through
    args = parser.parse_args(argv)
    binary = find_vllm()
    command = [binary, "serve", *vllm_arguments(args.model_path, args.model, args.host, args.port, args.max_num_seqs)]
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
    if args.api_key:
        command += ["--api-key", args.api_key]
    for flag in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        if getattr(args, flag):
            command += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.cpu:
        command += CPU_ARGUMENTS
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
    sys.stdout.flush()
    os.execve(binary, command, env)


if __name__ == "__main__":
    main()
