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

    status = commands.add_parser("status", help="show every endpoint's load, weight and metric freshness")
    status.add_argument("--config", type=Path, help="gateway YAML, for the status address (default: the embedded one)")
    status.add_argument("--url", help="the control plane's API (default: http://listen.admin_address:admin_port)")
    status.add_argument("--json", action="store_true", help="print the raw JSON report")

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
    if args.command == "status":
        sys.exit(_status(args, config))
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


def _status(args: argparse.Namespace, config) -> int:
    import json
    import urllib.error
    import urllib.request

    from control_plane.status import render_table

    url = (args.url or f"http://{config.listen.admin_address}:{config.listen.admin_port}").rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            report = json.load(response)
    except (urllib.error.URLError, OSError) as error:
        print(f"whisper-gateway: cannot reach the control plane at {url}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0
