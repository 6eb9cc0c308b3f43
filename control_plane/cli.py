"""The `whisper-gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from control_plane.bootstrap import BOOTSTRAP_TEMPLATE, default_node_id, render_bootstrap
from control_plane.config import ConfigError, GatewayConfig, load_config
from control_plane.fleet.state_store import client_token, state_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-gateway", description="Load-aware gateway for Whisper on vLLM.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub):
        sub.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")
        return sub

    def with_state(sub):
        sub.add_argument("--state-dir", type=Path,
                         help="API changes and the admin token (default: $WHISPER_GATEWAY_STATE_DIR or .whisper-gateway)")
        return sub

    up = with_state(with_config(commands.add_parser(
        "up", help="run engines, control plane and Envoy from one config, in the foreground")))
    up.add_argument("--run-dir", type=Path, help="where logs, Envoy's bootstrap and the sample clip go")

    with_state(with_config(commands.add_parser(
        "serve", help="run the control plane (xDS server, admin API); SIGHUP reloads the config")))

    def api_command(name: str, help_text: str):
        sub = with_state(with_config(commands.add_parser(name, help=help_text)))
        sub.add_argument("--url", help="the admin API (default: http(s)://listen.admin_address:admin_port)")
        sub.add_argument("--json", action="store_true", help="print the raw JSON answer")
        return sub

    api_command("status", "show every endpoint's state, load, weight and metric freshness")
    backends = api_command("backends", "list, add, drain, resume or remove backends")
    backends.add_argument("action", choices=["list", "add", "drain", "resume", "remove"])
    backends.add_argument("target", nargs="?", help="URL to add; id (or URL) to drain, resume or remove")
    backends.add_argument("--model", action="append", dest="models", help="with add: a model it serves (repeat)")
    backends.add_argument("--weight", type=int, help="with add: base weight 1..128")
    backends.add_argument("--timeout", type=float, help="with drain: seconds before removal anyway")
    backends.add_argument("--force", action="store_true", help="with remove: now, without draining")

    keys = api_command("keys", "create, list, rotate, revoke or change API keys; show their usage")
    keys.add_argument("action", choices=["list", "create", "set", "rotate", "revoke", "usage"])
    keys.add_argument("target", nargs="?", help="with create: the new key's name; else the key's id or name")
    keys.add_argument("--name", help="with set: a new name")
    keys.add_argument("--model", action="append", dest="models", help="with create or set: a model it may use "
                                                                      "(repeat; default: all)")
    keys.add_argument("--all-models", action="store_true", help="with set: lift the model restriction")
    keys.add_argument("--class", dest="key_class", choices=["interactive", "batch"], help="with create or set")
    keys.add_argument("--plan", help="with create or set: its limits, a plan under auth.plans (\"\": the default plan)")
    keys.add_argument("--grace", type=float, help="with rotate: seconds the previous secret keeps working "
                                                  "(default: auth.rotation_grace_s)")

    envoy = with_config(commands.add_parser(
        "envoy", help="run Envoy for this config: write its bootstrap, then become Envoy (containers use this)"))
    envoy.add_argument("--node-id", default=None, help="Envoy node id (default: envoy-<hostname>)")
    envoy.add_argument("--xds-host", default=None, help="host Envoy dials for xDS (default: listen.xds_address)")
    envoy.add_argument("--bootstrap", type=Path, default=None, help="where to write the bootstrap (default: a temp file)")

    drain = with_config(commands.add_parser(
        "envoy-drain", help="drain an Envoy before restarting it: fail /health, close listeners, wait for "
                            "requests in flight; exits 0 when idle, 1 at the timeout"))
    drain.add_argument("--admin", default=None, help="Envoy's admin URL (default: http://127.0.0.1:listen.envoy_admin_port)")
    drain.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for requests in flight")
    drain.add_argument("--lb-grace", type=float, default=0.0,
                       help="seconds between failing /health and closing listeners (your load balancer's "
                            "health-check interval x threshold)")

    boot = with_config(commands.add_parser("envoy-bootstrap", help="write Envoy's bootstrap for this config"))
    boot.add_argument("--node-id", default=None, help="Envoy node id (default: envoy-<hostname>)")
    boot.add_argument("--xds-host", default=None, help="host Envoy dials for xDS (default: listen.xds_address)")
    boot.add_argument("--admin-port", type=int, default=None, help="Envoy admin port (default: listen.envoy_admin_port)")
    boot.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"whisper-gateway: {error}", file=sys.stderr)
        sys.exit(2)
    if args.command == "serve":
        from control_plane.app import serve

        sys.exit(asyncio.run(serve(args.config, args.state_dir)))
    if args.command in ("status", "backends"):
        sys.exit(_run_api_command(args, config))
    if args.command == "keys":
        sys.exit(_run_keys_command(args, config))
    if args.command == "envoy":
        _exec_envoy(args, config)
    if args.command == "envoy-drain":
        sys.exit(asyncio.run(_drain(args, config)))
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
    sys.exit(asyncio.run(up(config, args.config, run_dir, state_dir(args.state_dir))))


async def _drain(args: argparse.Namespace, config: GatewayConfig) -> int:
    import aiohttp

    from control_plane.supervisor import drain_envoy

    admin = (args.admin or f"http://127.0.0.1:{config.listen.envoy_admin_port}").rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            async with session.get(f"{admin}/ready"):
                pass
        except aiohttp.ClientError as error:
            print(f"whisper-gateway: cannot reach Envoy's admin at {admin}: {error}", file=sys.stderr)
            return 1
        idle = await drain_envoy(session, admin, args.timeout, args.lb_grace)
    print(f"Envoy at {admin}: " + ("drained, no request in flight; restart it now" if idle
                                   else f"requests still in flight after {args.timeout:g} s"), flush=True)
    return 0 if idle else 1


class ApiFailure(Exception):
    pass


def admin_tls(config: GatewayConfig) -> ssl.SSLContext | None:
    """The CLI runs beside the control plane: it trusts exactly the leaf certificate of
    listen.tls.cert_file (pinned: the name it was issued for need not be the address dialled, and
    the rest of the chain, which signs others too, is not trusted)."""
    if config.listen.tls is None:
        return None
    from control_plane.certificates import PEM_CERTIFICATE

    leaf = PEM_CERTIFICATE.search(Path(config.listen.tls.cert_file).read_bytes())
    context = ssl.create_default_context(cadata=leaf.group().decode() if leaf else "")
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def _call(args: argparse.Namespace, config: GatewayConfig, method: str, path: str, body: dict | None = None):
    base = (args.url or config.listen.admin_url).rstrip("/")
    token = client_token(state_dir(args.state_dir))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30,
                                    context=admin_tls(config) if base.startswith("https://") else None) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = error.reason
        raise ApiFailure(f"{method} {path}: HTTP {error.code}: {message}") from None
    except (urllib.error.URLError, OSError) as error:
        raise ApiFailure(f"cannot reach the control plane at {base}: {error}") from None


def _backend_id(args, config, target: str) -> str:
    if target.startswith("http://") or target.startswith("https://"):
        for backend in _call(args, config, "GET", "/backends")["data"]:
            if backend["url"] == target.rstrip("/"):
                return backend["id"]
        raise ApiFailure(f"no backend with URL {target}")
    return target


def _backends_table(backends: list[dict]) -> str:
    from control_plane.operator.status import render_rows

    header = ("ID", "URL", "MODELS", "SOURCE", "STATE", "WEIGHT")
    rows = [(b["id"], b["url"], ",".join(b["models"]), b["source"], b["state"],
             ",".join(str(e["weight"]) if e["weight"] is not None else "-" for e in b["endpoints"]) or "-")
            for b in backends]
    return "\n".join(render_rows(header, rows))


def _run_api_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    from control_plane.operator.status import render_table

    try:
        if args.command == "status":
            answer = _call(args, config, "GET", "/status")
            print(json.dumps(answer, indent=2) if args.json else render_table(answer))
            return 0
        if args.action != "list" and not args.target:
            raise ApiFailure(f"backends {args.action} needs a target (URL or id)")
        if args.action == "list":
            answer = _call(args, config, "GET", "/backends")
            print(json.dumps(answer, indent=2) if args.json else _backends_table(answer["data"]))
            return 0
        if args.action == "add":
            body: dict = {"url": args.target}
            if args.models:
                body["models"] = args.models
            if args.weight is not None:
                body["weight"] = args.weight
            answer = _call(args, config, "POST", "/backends", body)
        elif args.action == "drain":
            body = {"timeout_s": args.timeout} if args.timeout is not None else {}
            answer = _call(args, config, "POST", f"/backends/{_backend_id(args, config, args.target)}/drain", body)
        elif args.action == "resume":
            answer = _call(args, config, "POST", f"/backends/{_backend_id(args, config, args.target)}/resume", {})
        else:
            force = "?force=true" if args.force else ""
            answer = _call(args, config, "DELETE", f"/backends/{_backend_id(args, config, args.target)}{force}")
        print(json.dumps(answer, indent=2) if args.json else f"{answer['id']} {answer['url']}: {answer['state']}")
        return 0
    except ApiFailure as failure:
        print(f"whisper-gateway: {failure}", file=sys.stderr)
        return 1


def _key_id(args, config, target: str | None) -> str:
    if not target:
        raise ApiFailure(f"keys {args.action} needs the key's id or name")
    if target.startswith("key-"):
        return target
    for key in _call(args, config, "GET", "/keys")["data"]:
        if key["name"] == target and key["state"] == "active":
            return key["id"]
    raise ApiFailure(f"no active key named {target!r}")


def _keys_table(keys: list[dict]) -> str:
    from control_plane.operator.status import render_rows

    header = ("ID", "NAME", "STATE", "PLAN", "CLASS", "MODELS", "REQUESTS", "IN FLIGHT", "AUDIO SERVED (s)")
    rows = [(k["id"], k["name"], k["state"], k["plan"] or "default", k["class"], ",".join(k["models"] or ["all"]),
             str(sum(u["requests"] for u in k["usage"].values())), str(k.get("requests_in_flight", 0)),
             f"{sum(u['audio_served_s'] for u in k['usage'].values()):.1f}") for k in keys]
    return "\n".join(render_rows(header, rows))


def _key_body(args) -> dict:
    body: dict = {}
    if args.name:
        body["name"] = args.name
    if args.models:
        body["models"] = args.models
    if args.all_models:
        body["models"] = None
    if args.key_class:
        body["class"] = args.key_class
    if args.plan is not None:
        body["plan"] = args.plan or None  # "": back to auth.default_plan
    return body


def _run_keys_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    try:
        if args.action in ("list", "usage"):
            keys = _call(args, config, "GET", "/keys")["data"]
            if args.action == "usage" and args.target:
                keys = [_call(args, config, "GET", f"/keys/{_key_id(args, config, args.target)}")]
            print(json.dumps(keys, indent=2) if args.json else _keys_table(keys))
            return 0
        if args.action == "create":
            if not args.target:
                raise ApiFailure("keys create needs a name for the new key")
            answer = _call(args, config, "POST", "/keys", _key_body(args) | {"name": args.target})
        elif args.action == "set":
            answer = _call(args, config, "PATCH", f"/keys/{_key_id(args, config, args.target)}", _key_body(args))
        elif args.action == "rotate":
            body = {"grace_s": args.grace} if args.grace is not None else {}
            answer = _call(args, config, "POST", f"/keys/{_key_id(args, config, args.target)}/rotate", body)
        else:
            answer = _call(args, config, "DELETE", f"/keys/{_key_id(args, config, args.target)}")
        if args.json:
            print(json.dumps(answer, indent=2))
        elif "secret" in answer:  # create and rotate: the only time the secret is shown
            print(f"{answer['id']} ({answer['name']}): its secret, shown only now; keep it safe:", file=sys.stderr)
            print(answer["secret"])
        else:
            print(f"{answer['id']} ({answer['name']}): {answer['state']}")
        return 0
    except ApiFailure as failure:
        print(f"whisper-gateway: {failure}", file=sys.stderr)
        return 1


def _exec_envoy(args: argparse.Namespace, config: GatewayConfig) -> None:
    """Replaces this process with Envoy, so signals (SIGTERM from a container runtime) reach it."""
    import os

    from control_plane.supervisor import ENVOY_FLAGS, find_envoy

    path = args.bootstrap or Path(tempfile.mkdtemp(prefix="whisper-gateway-envoy-")) / "bootstrap.yaml"
    path.write_text(render_bootstrap(BOOTSTRAP_TEMPLATE.read_text(), config, node_id=args.node_id or default_node_id(),
                                     xds_host=args.xds_host))
    binary = find_envoy()
    os.execv(binary, [binary, *ENVOY_FLAGS, "-c", str(path)])
