"""`python -m engines.simulated`: one simulated vLLM engine on a port."""

from __future__ import annotations

import argparse
import asyncio

from engines.common.api import DEFAULT_MAX_UPLOAD_BYTES, EngineApp
from engines.common.metrics import VllmMetrics
from engines.common.runner import add_tls_arguments, configure_logging, serve_until_signal, tls_context
from engines.simulated.faults import Faults, install_faults
from engines.simulated.queue_model import GpuProfile
from engines.simulated.server import SimulatedBackend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GpuProfile()
    parser = argparse.ArgumentParser(prog="python -m engines.simulated", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", action="append", required=True,
                        help="served model name (repeat for several names, as vLLM's --served-model-name)")
    parser.add_argument("--name", default=None, help="engine name used in responses (default: sim-<port>)")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--speed", type=float, default=defaults.speed, help="relative GPU speed (2 = twice as fast)")
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale,
                        help="wall seconds per simulated second (0.01 = 100x faster than real time)")
    parser.add_argument("--seconds-per-chunk", type=float, default=defaults.seconds_per_chunk,
                        help="decoding work of a full 30 s chunk alone (GPU seconds)")
    parser.add_argument("--seconds-per-request", type=float, default=defaults.seconds_per_request,
                        help="fixed work per engine request: the encoder's padded 30 s window")
    parser.add_argument("--batch-penalty", type=float, default=defaults.batch_penalty)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--api-key", default=None, help="like vLLM's: /v1 paths need this bearer key")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_num_seqs < 1 or min(args.speed, args.time_scale, args.seconds_per_chunk, args.seconds_per_request) <= 0:
        parser.error("--max-num-seqs must be >= 1; --speed, --time-scale and --seconds-per-* > 0")
    return args


async def serve(args: argparse.Namespace) -> None:
    profile = GpuProfile(
        max_num_seqs=args.max_num_seqs, speed=args.speed, time_scale=args.time_scale,
        seconds_per_chunk=args.seconds_per_chunk, seconds_per_request=args.seconds_per_request,
        batch_penalty=args.batch_penalty,
    )
    backend = SimulatedBackend(args.name or f"sim-{args.port}", tuple(args.model), profile)
    backend.metrics = VllmMetrics(args.model[0], backend.load)
    app = EngineApp(backend, backend.metrics, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    api_key=args.api_key).build()
    install_faults(app, Faults(), backend.queue.set_slowdown)
    try:
        await serve_until_signal(app, args.host, args.port, f"simulated engine {backend.name} serving {args.model}",
                                 tls_context(args))
    finally:
        await backend.queue.close()


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
