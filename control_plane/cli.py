"""The `whisper-gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from control_plane.bootstrap import BOOTSTRAP_TEMPLATE, default_node_id, render_bootstrap
from control_plane.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-gateway", description="Load-aware gateway for Whisper on vLLM.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run engines, control plane and Envoy from one config, in the foreground")
    up.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")
    up.add_argument("--run-dir", type=Path, help="where logs, Envoy's bootstrap and the sample clip go")

    serve = commands.add_parser("serve", help="run the control plane (xDS server); SIGHUP reloads the config")
    serve.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")

    boot = commands.add_parser("envoy-bootstrap", help="write Envoy's bootstrap for this config")
    boot.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")
    boot.add_argument("--node-id", default=None, help="Envoy node id (default: envoy-<hostname>)")
    boot.add_argument("--xds-host", default=None, help="host Envoy dials for xDS (default: listen.xds_address)")
    boot.add_argument("--admin-port", type=int, default=None, help="Envoy admin port (default: listen.envoy_admin_port)")
    boot.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from control_plane.app import serve

        sys.exit(asyncio.run(serve(args.config)))
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"whisper-gateway: {error}", file=sys.stderr)
        sys.exit(2)
    if args.command == "envoy-bootstrap":
        text = render_bootstrap(BOOTSTRAP_TEMPLATE.read_text(), config, node_id=args.node_id or default_node_id(),
                                xds_host=args.xds_host, admin_port=args.admin_port)
        if args.output:
            args.output.write_text(text)
        else:
            sys.stdout.write(text)
        return
    from control_plane.supervisor import up

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="whisper-gateway-"))
    sys.exit(asyncio.run(up(config, args.config, run_dir)))
