"""The `whisper-gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from control_plane.bootstrap import BOOTSTRAP_TEMPLATE, default_node_id, render_bootstrap, write_bootstrap
from control_plane.config import ConfigError, GatewayConfig, load_config
from control_plane.fleet.local_store import client_token, state_dir
from control_plane.operator.tokens import ID_PREFIX as TOKEN_ID_PREFIX, ROLES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-gateway", description="Load-aware gateway for Whisper on vLLM.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    _add_api_commands(commands)
    _add_envoy_command(commands)
    _add_certs_command(commands)
    _add_envoy_tools(commands)
    _add_check_command(commands)
    _add_longform_command(commands)
    return parser


def _with_config(sub):
    # Containers set WHISPER_GATEWAY_CONFIG, so `docker compose exec control-plane whisper-gateway
    # keys create NAME` finds the admin API (its address, its TLS) without --config.
    given = os.environ.get("WHISPER_GATEWAY_CONFIG") or None
    sub.add_argument("--config", type=Path, default=Path(given) if given else None,
                     help="gateway YAML (default: $WHISPER_GATEWAY_CONFIG, else the embedded one)")
    return sub


def _with_state(sub):
    sub.add_argument("--state-dir", type=Path,
                     help="API changes and the admin token (default: $WHISPER_GATEWAY_STATE_DIR or .whisper-gateway)")
    return sub


def _add_run_commands(commands) -> None:
    """up and serve: the processes."""
    up = _with_state(_with_config(commands.add_parser(
        "up", help="run engines, control plane and Envoy from one config, in the foreground")))
    up.add_argument("--run-dir", type=Path, help="where logs, Envoy's bootstrap and the sample clip go")

    _with_state(_with_config(commands.add_parser(
        "serve", help="run the control plane (xDS server, admin API); SIGHUP reloads the config")))


def _api_command(commands, name: str, help_text: str):
    sub = _with_state(_with_config(commands.add_parser(name, help=help_text)))
    sub.add_argument("--url", help="the admin API (default: http(s)://listen.admin_address:admin_port)")
    sub.add_argument("--json", action="store_true", help="print the raw JSON answer")
    return sub


def _add_api_commands(commands) -> None:
    """The commands that call the admin API: status, backends, keys, tokens, audit."""
    _api_command(commands, "status", "show every endpoint's state, load, weight and metric freshness")
    backends = _api_command(commands, "backends", "list, add, drain, resume or remove backends")
    backends.add_argument("action", choices=["list", "add", "drain", "resume", "remove"])
    backends.add_argument("target", nargs="?", help="URL to add; id (or URL) to drain, resume or remove")
    backends.add_argument("--model", action="append", dest="models", help="with add: a model it serves (repeat)")
    backends.add_argument("--weight", type=int, help="with add: base weight 1..128")
    backends.add_argument("--timeout", type=float, help="with drain: seconds before removal anyway")
    backends.add_argument("--force", action="store_true", help="with remove: now, without draining")

    keys = _api_command(commands, "keys", "create, list, rotate, revoke or change API keys; show their usage")
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
    keys.add_argument("--since", help="with usage: per day from this UTC day on (YYYY-MM-DD), for billing: every "
                                      "control plane's records, kept state.usage_days")
    keys.add_argument("--until", help="with usage --since: to this day, inclusive (default: today)")
    keys.add_argument("--csv", action="store_true", help="with usage --since: as CSV")

    tokens = _api_command(commands, "tokens", "create, list or revoke named admin tokens (roles: viewer, operator, admin)")
    tokens.add_argument("action", choices=["list", "create", "revoke"])
    tokens.add_argument("target", nargs="?", help="with create: the new token's name; with revoke: its id or name")
    tokens.add_argument("--role", choices=ROLES, help="with create: what it may do")

    audit = _api_command(commands, "audit", "who changed what through the admin API, oldest first")
    audit.add_argument("--since", help="from this time on (ISO 8601, UTC unless it says otherwise); default: the "
                                       "newest --limit records")
    audit.add_argument("--limit", type=int, default=1000, help="records at most (1..1000, default 1000)")


def _add_envoy_command(commands) -> None:
    envoy = _with_config(commands.add_parser(
        "envoy", help="run Envoy for this config: write its bootstrap, then become Envoy (containers use this)"))
    envoy.add_argument("--node-id", default=None, help="Envoy node id (default: envoy-<hostname>, or "
                                                       "<identity>.<hostname> with --identity)")
    envoy.add_argument("--identity", default=None, help="with internal_tls: its certificate, envoy-<identity> in "
                                                        "internal_tls.dir (default: the node id up to a first dot)")
    envoy.add_argument("--xds-host", default=None, help="host Envoy dials for xDS (default: listen.xds_address)")
    envoy.add_argument("--bootstrap", type=Path, default=None, help="where to write the bootstrap (default: a temp file)")


def _add_certs_command(commands) -> None:
    certs = _with_state(_with_config(commands.add_parser(
        "certs", help="the internal CA and the certificates of control planes, Envoys and etcd (internal_tls)")))
    certs.add_argument("action", choices=["init", "issue", "renew", "list"],
                       help="init: the CA and the control plane's certificate; issue ROLE NAME; renew: those "
                            "expiring soon; list")
    certs.add_argument("role", nargs="?", choices=["control-plane", "envoy", "etcd", "etcd-client"],
                       help="with issue (etcd and etcd-client: signed by etcd's own CA, etcd-ca.pem)")
    certs.add_argument("name", nargs="?", help="with issue: the Envoy's or etcd member's name")
    certs.add_argument("--dir", type=Path, help="the folder (default: internal_tls.dir, else <state dir>/pki)")
    certs.add_argument("--host", action="append", dest="hosts", default=[],
                       help="a DNS name or address the part answers on (repeat): control planes and etcd members")
    certs.add_argument("--envoy", action="append", default=[], help="with init: an Envoy's certificate to make "
                                                                     "when missing (repeat)")
    certs.add_argument("--etcd", action="append", default=[], help="with init: an etcd member's certificate to make "
                                                                   "when missing (repeat; its --host names too)")
    certs.add_argument("--days", type=int, default=None, help="validity of issued certificates (default 90)")
    certs.add_argument("--within-days", type=float, default=30.0, help="with renew: renew what expires within this")


def _add_envoy_tools(commands) -> None:
    """envoy-drain and envoy-bootstrap: an Envoy's restart and its bootstrap file."""
    drain = _with_config(commands.add_parser(
        "envoy-drain", help="drain an Envoy before restarting it: fail /health, close listeners, wait for "
                            "requests in flight; exits 0 when idle, 1 at the timeout"))
    drain.add_argument("--admin", default=None, help="Envoy's admin URL (default: http://127.0.0.1:listen.envoy_admin_port)")
    drain.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for requests in flight")
    drain.add_argument("--lb-grace", type=float, default=0.0,
                       help="seconds between failing /health and closing listeners (your load balancer's "
                            "health-check interval x threshold)")

    boot = _with_config(commands.add_parser("envoy-bootstrap", help="write Envoy's bootstrap for this config"))
    boot.add_argument("--node-id", default=None, help="Envoy node id (default: envoy-<hostname>)")
    boot.add_argument("--xds-host", default=None, help="host Envoy dials for xDS (default: listen.xds_address)")
    boot.add_argument("--admin-port", type=int, default=None, help="Envoy admin port (default: listen.envoy_admin_port)")
    boot.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")


def _add_check_command(commands) -> None:
    check = commands.add_parser("check", help="check a gateway config before deploying it (a Helm chart's "
                                              "rendered gateway.yaml too): every problem found, or ok")
    check.add_argument("config_file", type=Path, metavar="CONFIG")
    check.add_argument("--envoy", action="store_true",
                       help="also run `envoy --mode validate` on the bootstrap it implies (with stand-in internal "
                            "certificates when internal_tls.dir is not on this machine)")
    check.add_argument("--xds-host", default=None, help="with --envoy: as `whisper-gateway envoy` is given it")
    check.add_argument("--identity", default="envoy", help="with --envoy: the Envoy's certificate (default: envoy)")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _socket_or_host_port(value: str) -> str | tuple[str, int]:
    """unix:PATH (a socket, as `up` and `whisper-gateway envoy` start workers) or HOST:PORT."""
    if value.startswith("unix:"):
        if not value.removeprefix("unix:").startswith("/"):
            raise argparse.ArgumentTypeError(f"expected unix: and an absolute path, got {value!r}")
        return value.removeprefix("unix:")
    return _host_port(value)


def _socket_or_url(value: str) -> str:
    if value.startswith("unix:"):
        return "unix:" + str(_socket_or_host_port(value))
    return _http_url(value)


def _add_longform_command(commands) -> None:
    worker = commands.add_parser("longform-worker", help="cut long recordings Envoy routes here into pieces, send "
                                                         "them to the fleet, answer as one engine")
    worker.add_argument("--listen", type=_socket_or_host_port, required=True, metavar="unix:PATH|HOST:PORT",
                        help="a Unix socket (in a directory only this user may enter, made so if missing) or "
                             "HOST:PORT")
    worker.add_argument("--pieces", type=_socket_or_url, required=True, metavar="unix:PATH|URL",
                        help="where each piece is sent (Envoy's pieces listener: its Unix socket)")
    worker.add_argument("--max-upload-mb", type=float, default=None,
                        help="the largest recording accepted, MiB (default 1024)")
    worker.add_argument("--max-audio-s", type=float, default=None,
                        help="the longest recording accepted, seconds of audio (default 14400: limits.max_audio_s)")
    worker.add_argument("--keep-running", action="store_true",
                        help="run the worker as a child, started again whenever it exits (until SIGTERM)")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check":
        sys.exit(_run_check(args))
    if args.command == "longform-worker":
        from control_plane.longform.sockets import SocketDirProblem
        from control_plane.longform.worker import DEFAULT_MAX_AUDIO_S, DEFAULT_MAX_UPLOAD_MB, serve as serve_longform

        if args.keep_running:
            from control_plane.supervisor import keep_running

            arguments = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--keep-running"]
            where = args.listen if isinstance(args.listen, str) else f"{args.listen[0]}:{args.listen[1]}"
            sys.exit(keep_running([sys.executable, "-m", "control_plane", *arguments], f"the longform worker on {where}"))

        try:
            sys.exit(asyncio.run(serve_longform(args.listen, args.pieces, args.max_upload_mb or DEFAULT_MAX_UPLOAD_MB,
                                                args.max_audio_s or DEFAULT_MAX_AUDIO_S)))
        except SocketDirProblem as problem:
            print(f"whisper-gateway: {problem}", file=sys.stderr)
            sys.exit(2)
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
    if args.command == "tokens":
        sys.exit(_run_tokens_command(args, config))
    if args.command == "audit":
        sys.exit(_run_audit_command(args, config))
    if args.command == "envoy":
        _exec_envoy(args, config)
    if args.command == "envoy-drain":
        sys.exit(asyncio.run(_drain(args, config)))
    if args.command == "certs":
        sys.exit(_run_certs_command(args, config))
    if args.command == "envoy-bootstrap":
        node_id = args.node_id or default_node_id()
        if args.output:
            write_bootstrap(args.output, config, node_id, args.xds_host, args.admin_port)
        elif config.internal_tls is not None:
            print("whisper-gateway: with internal_tls the bootstrap comes with a second file: give --output",
                  file=sys.stderr)
            sys.exit(2)
        else:
            sys.stdout.write(render_bootstrap(BOOTSTRAP_TEMPLATE.read_text(), config, node_id=node_id,
                                              xds_host=args.xds_host, admin_port=args.admin_port))
        return
    from control_plane.supervisor import up

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="whisper-gateway-"))
    sys.exit(asyncio.run(up(config, args.config, run_dir, state_dir(args.state_dir))))


def _run_check(args: argparse.Namespace) -> int:
    """Every problem the loader finds in CONFIG, one a line (a process would stop at the first),
    then with --envoy Envoy's own verdict on its bootstrap; exit 1 with any, else `ok` and 0."""
    import yaml

    from control_plane.config import config_problems, parse_config

    path = args.config_file
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        found = [f"cannot read config: {error.strerror}"]
    except yaml.YAMLError as error:
        found = [f"not valid YAML: {error}"]
    else:
        found = config_problems(raw)
    if not found and args.envoy:
        found = _bootstrap_problems(parse_config(raw), args.xds_host, args.identity)
    for problem in found:
        print(f"{path}: {problem}", file=sys.stderr)
    if not found:
        print(f"{path}: ok" + (" (Envoy's bootstrap validated)" if args.envoy else ""))
    return 1 if found else 0


def _bootstrap_problems(config: GatewayConfig, xds_host: str | None, identity: str) -> list[str]:
    """What `envoy --mode validate` says of the bootstrap `whisper-gateway envoy` would write. The
    internal certificates usually live where the config is deployed (a Kubernetes Secret), not
    here: throwaway ones of the same names stand in, so the bootstrap's shape is what is checked."""
    import subprocess
    from dataclasses import replace

    from control_plane import internal_pki
    from control_plane.config import InternalTlsConfig
    from control_plane.supervisor import find_envoy

    with tempfile.TemporaryDirectory(prefix="whisper-gateway-check-") as folder:
        folder = Path(folder)
        if config.internal_tls is not None and not internal_pki.ca_path(config.internal_tls.dir).exists():
            internal_pki.init_ca(folder / "pki")
            internal_pki.issue(folder / "pki", "envoy", identity)
            config = replace(config, internal_tls=InternalTlsConfig(dir=str(folder / "pki")))
        bootstrap = write_bootstrap(folder / "bootstrap.yaml", config, f"{identity}.check", xds_host, identity=identity)
        result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(bootstrap)], capture_output=True,
                                text=True, timeout=120)
    if result.returncode == 0:
        return []
    said = (result.stderr or result.stdout).strip().splitlines()
    return [f"Envoy refuses the bootstrap this config implies: {said[-1] if said else f'exit {result.returncode}'}"]


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
    """How the CLI checks the admin API's certificate (GatewayConfig.admin_tls). With internal_tls:
    against the internal CA (internal_tls.dir/ca.pem), host name and all; the control plane's
    certificate names localhost and 127.0.0.1 (plus any host it was issued for), which is what the
    CLI beside it dials (compose publishes the admin port on 127.0.0.1; an unspecified
    admin_address is dialled as 127.0.0.1), so no pinning and no exception to the name check.
    Else it runs beside the control plane and trusts exactly the leaf certificate of
    listen.tls.cert_file (pinned: the name it was issued for need not be the address dialled, and
    the rest of the chain, which signs others too, is not trusted)."""
    if config.internal_tls is not None:
        from control_plane.internal_pki import ca_path

        return ssl.create_default_context(cafile=str(ca_path(config.internal_tls.dir)))
    if config.listen.tls is None:
        return None
    from control_plane.certificates import PEM_CERTIFICATE

    leaf = PEM_CERTIFICATE.search(Path(config.listen.tls.cert_file).read_bytes())
    context = ssl.create_default_context(cadata=leaf.group().decode() if leaf else "")
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def _admin_base(args: argparse.Namespace, config: GatewayConfig) -> str:
    """--url, else the admin API as the config places it; an unspecified address (0.0.0.0, ::) is
    dialled on loopback, as connecting to it would anyway, by a name its certificate holds."""
    if args.url:
        return args.url.rstrip("/")
    listen = config.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.admin_address, listen.admin_address)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if config.admin_tls else 'http'}://{host}:{listen.admin_port}"


def _call(args: argparse.Namespace, config: GatewayConfig, method: str, path: str, body: dict | None = None):
    base = _admin_base(args, config)
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
        hint = ""
        if isinstance(getattr(error, "reason", error), ssl.SSLCertVerificationError) and config.internal_tls:
            hint = (" (the admin API's certificate is checked against internal_tls.dir's ca.pem and the host dialled: "
                    "issue control-plane.pem for that host, `whisper-gateway certs issue control-plane --host HOST`, "
                    "or dial 127.0.0.1)")
        raise ApiFailure(f"cannot reach the control plane at {base}: {error}{hint}") from None


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


def _print_usage(args: argparse.Namespace, config: GatewayConfig) -> None:
    """`keys usage [KEY] --since DAY [--until DAY] [--csv | --json]`: GET /usage, per day, key and model."""
    from urllib.parse import urlencode

    from control_plane.observe.usage import FIGURES, as_csv
    from control_plane.operator.status import render_rows

    query = {"from": args.since} | ({"to": args.until} if args.until else {}) | (
        {"key": _key_id(args, config, args.target)} if args.target else {})
    rows = _call(args, config, "GET", "/usage?" + urlencode(query))["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        print(as_csv(rows), end="")
    else:
        header = ("DAY", "KEY", "MODEL", *(name.upper().replace("AUDIO_", "").replace("_S", " (s)") for name in FIGURES))
        print("\n".join(render_rows(header, [(r["day"], r["key"] or "-", r["model"], *(str(r[n]) for n in FIGURES))
                                             for r in rows])))


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
        if args.action == "usage" and args.since:
            _print_usage(args, config)
            return 0
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
        _print_change(args, answer, f"{answer['id']} ({answer['name']})")
        return 0
    except ApiFailure as failure:
        print(f"whisper-gateway: {failure}", file=sys.stderr)
        return 1


def _when(epoch: float | None) -> str:
    from datetime import datetime, timezone

    return "-" if epoch is None else f"{datetime.fromtimestamp(epoch, timezone.utc):%Y-%m-%d %H:%M:%S}"


def _print_change(args: argparse.Namespace, answer: dict, label: str) -> None:
    """A key's or token's change as the CLI shows it: its new secret (on stdout, alone, shown only
    now: create and rotate), else its state; the raw answer with --json."""
    if args.json:
        print(json.dumps(answer, indent=2))
    elif "secret" in answer:
        print(f"{label}: its secret, shown only now; keep it safe:", file=sys.stderr)
        print(answer["secret"])
    else:
        print(f"{answer['id']} ({answer['name']}): {answer['state']}")
    if answer.get("not_applied_by"):
        print(f"not yet applied by {', '.join(answer['not_applied_by'])} (see whisper-gateway status)", file=sys.stderr)


def _run_tokens_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    from control_plane.operator.status import render_rows

    try:
        if args.action == "list":
            tokens = _call(args, config, "GET", "/tokens")["data"]
            rows = [(t["id"], t["name"], t["role"], t["state"], _when(t["created_at"]), _when(t["revoked_at"]))
                    for t in tokens]
            print(json.dumps(tokens, indent=2) if args.json else "\n".join(render_rows(
                ("ID", "NAME", "ROLE", "STATE", "CREATED (UTC)", "REVOKED (UTC)"), rows)))
            return 0
        if not args.target:
            raise ApiFailure(f"tokens {args.action} needs " + ("a name for the new token" if args.action == "create"
                                                               else "the token's id or name"))
        if args.action == "create":
            if not args.role:
                raise ApiFailure("tokens create needs --role viewer, operator or admin")
            answer = _call(args, config, "POST", "/tokens", {"name": args.target, "role": args.role})
        else:
            token_id = args.target
            if not token_id.startswith(TOKEN_ID_PREFIX):
                found = [t["id"] for t in _call(args, config, "GET", "/tokens")["data"]
                         if t["name"] == token_id and t["state"] == "active"]
                if not found:
                    raise ApiFailure(f"no active admin token named {token_id!r}")
                token_id = found[0]
            answer = _call(args, config, "DELETE", f"/tokens/{token_id}")
        _print_change(args, answer, f"{answer['id']} ({answer['name']}, {answer.get('role')})")
        return 0
    except ApiFailure as failure:
        print(f"whisper-gateway: {failure}", file=sys.stderr)
        return 1


def _run_audit_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    from urllib.parse import urlencode

    from control_plane.operator.status import render_rows

    query = {"limit": args.limit} | ({"since": args.since} if args.since else {})
    try:
        answer = _call(args, config, "GET", "/audit?" + urlencode(query))
    except ApiFailure as failure:
        print(f"whisper-gateway: {failure}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0

    def change(record: dict) -> str:
        before, after = record["before"] or {}, record["after"] or {}
        if not before or not after:
            return "made" if after else "gone"
        return ", ".join(f"{k}: {json.dumps(before.get(k))} -> {json.dumps(after.get(k))}"
                         for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)) or "-"

    rows = [(r["at"], r["who"], r["role"], r["source"], r["action"], r["target"], change(r)) for r in answer["data"]]
    print("\n".join(render_rows(("AT (UTC)", "WHO", "ROLE", "SOURCE", "ACTION", "TARGET", "CHANGE"), rows)))
    if answer.get("has_more"):
        print("(more records: use --since or --limit)", file=sys.stderr)
    return 0


def _run_certs_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    from control_plane import internal_pki as pki

    folder = args.dir or (Path(config.internal_tls.dir) if config.internal_tls else state_dir(args.state_dir) / "pki")
    days = {"days": args.days} if args.days else {}
    try:
        if args.action == "init":  # what is missing; nothing that exists is replaced (renew does that)
            made = pki.init_ca(folder)
            print(f"{pki.ca_path(folder)}: {'made' if made else 'already there'}")
            hosts = tuple(dict.fromkeys(["localhost", "127.0.0.1", *args.hosts]))
            wanted = [(pki.CONTROL_PLANE, pki.CONTROL_PLANE, hosts)] + [("envoy", n, ()) for n in args.envoy] + \
                [("etcd", n, hosts) for n in args.etcd] + \
                ([("etcd-client", pki.CONTROL_PLANE, ())] if args.etcd else [])  # the control planes' to etcd
            for role, name, names in wanted:
                if made := pki.issue_missing(folder, role, name, names, **days):
                    print(made)
        elif args.action == "issue":
            if not args.role or (args.role != pki.CONTROL_PLANE and not args.name):
                raise pki.PkiProblem("certs issue needs a role and, for envoy and etcd, a name")
            name = args.name if args.role != pki.CONTROL_PLANE else pki.CONTROL_PLANE
            hosts = tuple(args.hosts) or (("localhost", "127.0.0.1") if args.role in ("control-plane", "etcd") else ())
            cert, key = pki.issue(folder, args.role, name, hosts, **days)
            print(f"{cert}\n{key}")
        elif args.action == "renew":
            renewed = pki.renew(folder, args.within_days, **days)
            print("\n".join(f"renewed {item.identity} ({item.path})" for item in renewed) or "nothing to renew")
        else:
            from control_plane.operator.status import render_rows

            rows = [(str(i.identity), i.path.name, f"{i.not_after:%Y-%m-%d %H:%M}", ",".join(i.hosts) or "-")
                    for i in pki.issued(folder)]
            print("\n".join(render_rows(("IDENTITY", "FILE", "EXPIRES (UTC)", "HOSTS"), rows)))
    except (pki.PkiProblem, OSError) as problem:
        print(f"whisper-gateway: {problem}", file=sys.stderr)
        return 1
    return 0


def _exec_envoy(args: argparse.Namespace, config: GatewayConfig) -> None:
    """Replaces this process with Envoy, so signals (SIGTERM from a container runtime) reach it;
    the longform workers (longform.workers, on Unix sockets in longform.socket_dir, beside this
    Envoy) start first, as its children (each kept running: started again should it exit), and are
    sent SIGTERM when it exits."""
    import os
    import subprocess

    from control_plane.longform.sockets import SocketDirProblem, ensure_private
    from control_plane.supervisor import die_with_parent, envoy_command, longform_command

    import socket

    path = args.bootstrap or Path(tempfile.mkdtemp(prefix="whisper-gateway-envoy-")) / "bootstrap.yaml"
    node_id = args.node_id or (f"{args.identity}.{socket.gethostname()}" if args.identity else default_node_id())
    write_bootstrap(path, config, node_id, args.xds_host, identity=args.identity)
    argv, env = envoy_command(path)
    if config.longform.enabled:  # Envoy makes its pieces listener's socket there
        try:
            ensure_private(config.longform.socket_dir)
        except SocketDirProblem as problem:
            sys.exit(f"whisper-gateway: {problem}")
    for index in range(config.longform.workers):  # each started again should it exit
        subprocess.Popen(longform_command(config, index) + ["--keep-running"], preexec_fn=die_with_parent,
                         stdin=subprocess.DEVNULL)
    os.execve(argv[0], argv, env)
