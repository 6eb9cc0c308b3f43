"""The Helm chart (deploy/helm/whisper-gateway) proven without a cluster: rendered and linted by
Helm itself (helm_python, in-process), every object checked against Kubernetes 1.33's schemas
(and the CRDs' published ones), the gateway config it renders checked by `whisper-gateway check`,
and its control plane and Envoy run here with the commands and config it gives them."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from control_plane.cli import main as cli
from control_plane.config import config_problems
from control_plane.config.longform import worker_socket
from harness.processes import PYTHON, REPO, Process, free_port, request, socket_dir, start_engine, transcribe, wait_until

CHART = REPO / "deploy" / "helm" / "whisper-gateway"
VALUES_FILES = [None, "values-gpu.yaml", "values-cpu.yaml", "values-ha.yaml", "values-tls-cert-manager.yaml"]
RELEASE, NAMESPACE = "wg", "speech"
FULL = "wg-whisper-gateway"
DOMAIN = f"{NAMESPACE}.svc.cluster.local"
SCHEMAS = {kind: json.loads((REPO / "tests" / "fixtures" / "crd-schemas" / f"{file}.json").read_text())
           for kind, file in [("Certificate", "cert-manager.io_certificate_v1"),
                              ("ScaledObject", "keda.sh_scaledobject_v1alpha1"),
                              ("ServiceMonitor", "monitoring.coreos.com_servicemonitor_v1")]}
WORKLOADS = ("Deployment", "StatefulSet")


def values(*files: str | None) -> dict:
    """The values files layered as `helm install -f A -f B` does (nested maps merged)."""
    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}
    merged: dict = {}
    for file in files:
        if file:
            merged = merge(merged, yaml.safe_load((CHART / file).read_text()))
    return merged


def render(given: dict) -> list[dict]:
    import helm_python

    out = helm_python.Chart.load(str(CHART)).render(given, name=RELEASE, namespace=NAMESPACE)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def gateway_yaml(objects: list[dict]) -> dict:
    return yaml.safe_load(by_kind(objects, "ConfigMap")[f"{FULL}-config"]["data"]["gateway.yaml"])


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("file", VALUES_FILES)
def test_the_chart_renders_and_lints_clean_and_every_object_is_valid(file):
    import helm_python

    given = values(file)
    lint = helm_python.lint(str(CHART), values=given, strict=True, kube_version="1.33.0", namespace=NAMESPACE)
    assert lint["errors"] == [] and [m for m in lint["messages"] if m["severity"] > 1] == [], lint
    objects = render(given)
    for obj in objects:
        group = obj["apiVersion"].split("/")[0]
        if obj["kind"] in SCHEMAS:
            jsonschema.validate(obj, SCHEMAS[obj["kind"]])
        elif obj["kind"] == "Issuer":  # its published schema is 280 KB of ACME: the chart's two forms, by hand
            assert obj["apiVersion"] == "cert-manager.io/v1" and set(obj["spec"]) in ({"selfSigned"}, {"ca"})
            assert obj["spec"].get("selfSigned") == {} or obj["spec"]["ca"]["secretName"]
        else:
            assert "." not in group or group.endswith(".k8s.io"), obj["apiVersion"]
            kubernetes_validate.validate(obj, "1.33", strict=True)


def test_strict_validation_catches_what_it_should():
    """The checks above would fail a wrong object: an unknown field, in either kind of schema."""
    deployment = by_kind(render({}), "Deployment")[f"{FULL}-envoy"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33", strict=True)
    monitor = by_kind(render(values("values-gpu.yaml")), "ServiceMonitor")[f"{FULL}-envoy"]
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SCHEMAS["ServiceMonitor"])


@pytest.mark.parametrize("file", VALUES_FILES)
def test_pods_are_non_root_read_only_without_capabilities_and_probed(file):
    objects = render(values(file))
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert {w["metadata"]["name"] for w in workloads} >= {f"{FULL}-control-plane", f"{FULL}-envoy"}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
            assert security["allowPrivilegeEscalation"] is False
            assert "readinessProbe" in container and "livenessProbe" in container, workload["metadata"]["name"]
        assert "topologySpreadConstraints" in pod or workload["metadata"]["name"] == f"{FULL}-engine"


def test_ha_runs_two_planes_on_etcd_and_more_than_one_needs_etcd():
    import helm_python

    objects = render(values("values-ha.yaml", "values-gpu.yaml"))
    assert by_kind(objects, "Deployment")[f"{FULL}-control-plane"]["spec"]["replicas"] == 2
    etcd = by_kind(objects, "StatefulSet")[f"{FULL}-etcd"]
    assert etcd["spec"]["replicas"] == 3
    state = gateway_yaml(objects)["state"]
    assert state["etcd"] == [f"{FULL}-etcd-{i}.{FULL}-etcd.{DOMAIN}:2379" for i in range(3)]
    assert set(by_kind(objects, "PodDisruptionBudget")) == {f"{FULL}-{p}" for p in ("envoy", "control-plane", "engine",
                                                                                      "etcd")}
    with pytest.raises(helm_python.HelmError, match="needs etcd.enabled"):
        render({"controlPlane": {"replicas": 2}})


def test_services_and_network_policies_let_each_part_reach_only_what_it_should():
    objects = render(values("values-ha.yaml", "values-gpu.yaml"))
    services = by_kind(objects, "Service")
    pods = {name.removeprefix(f"{FULL}-"): w["spec"]["template"]["metadata"]["labels"]
            for name, w in {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}.items()}
    assert services[f"{FULL}-xds"]["spec"]["clusterIP"] == "None"  # every plane in each Envoy's xds_cluster
    assert services[f"{FULL}-admin"]["spec"]["type"] == "ClusterIP"
    assert services[f"{FULL}-envoy-metrics"]["spec"]["type"] == "ClusterIP"
    assert [p["name"] for p in services[FULL]["spec"]["ports"]] == ["audio"]  # the public one carries audio only

    def admitted(policy: dict, port: int) -> list:
        """Who may reach `port`: the pod names a rule admits, ["anyone"], or ["namespace"]."""
        for rule in policy["spec"]["ingress"]:
            if port in [p["port"] for p in rule["ports"]]:
                if "from" not in rule:
                    return ["anyone"]
                return sorted({"namespace" if peer["podSelector"] == {} else name for peer in rule["from"]
                               for name, labels in pods.items() if peer["podSelector"] == {} or
                               selects(peer["podSelector"], labels)})
        return []

    policies = {name.removeprefix(f"{FULL}-"): p for name, p in by_kind(objects, "NetworkPolicy").items()}
    for part, policy in policies.items():  # each policy is about its own part's pods
        assert [name for name, labels in pods.items() if selects(policy["spec"]["podSelector"], labels)] == [part]
    assert admitted(policies["envoy"], 8080) == ["anyone"]
    assert admitted(policies["envoy"], 9902) == ["namespace"]
    assert admitted(policies["control-plane"], 18000) == ["envoy"]  # xDS, access logs, quotas
    assert admitted(policies["control-plane"], 18001) == ["namespace"]  # admin API, /metrics
    assert admitted(policies["etcd"], 2379) == ["control-plane"]
    assert admitted(policies["etcd"], 2380) == ["etcd"]
    assert admitted(policies["engine"], 8000) == ["control-plane", "envoy"]


def test_engines_are_found_by_the_gateways_dns_discovery_and_get_their_gpus():
    objects = render(values("values-gpu.yaml"))
    engine = by_kind(objects, "Deployment")[f"{FULL}-engine"]
    service = by_kind(objects, "Service")[f"{FULL}-engine"]
    assert service["spec"]["clusterIP"] == "None" and selects({"matchLabels": service["spec"]["selector"]},
                                                               engine["spec"]["template"]["metadata"]["labels"])
    config = gateway_yaml(objects)
    assert config["discovery"] == [{"name": f"{FULL}-engine.{DOMAIN}", "port": service["spec"]["ports"][0]["port"],
                                    "models": ["whisper"], "interval_s": 5}]
    pod = engine["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][container["args"].index("--served-model-name") + 1] == config["models"][0]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    # The engines' own key: vLLM's --api-key and the gateway's auth.engine_api_key_env, one Secret.
    assert container["args"][container["args"].index("--api-key") + 1] == "$(ENGINE_API_KEY)"
    plane = by_kind(objects, "Deployment")[f"{FULL}-control-plane"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in plane["env"]}
    assert config["auth"]["engine_api_key_env"] in env
    assert env[config["auth"]["engine_api_key_env"]]["valueFrom"] == \
        {e["name"]: e for e in container["env"]}["ENGINE_API_KEY"]["valueFrom"]
    scaled = by_kind(objects, "ScaledObject")[f"{FULL}-engine"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == engine["metadata"]["name"] and "replicas" not in engine["spec"]
    assert scaled["spec"]["triggers"][0]["metadata"]["query"] == \
        'max(whisper_gateway_model_expected_wait_seconds{model="whisper"})'


@pytest.mark.parametrize("file", ["values-ha.yaml", "values-tls-cert-manager.yaml"])
def test_each_part_finds_its_internal_certificates_where_the_config_says(file):
    """The projected pki folder of each pod holds the files gateway.yaml, Envoy's bootstrap and etcd's
    flags name, whether they come from one Secret (`whisper-gateway certs init`) or cert-manager."""
    objects = render(values(file))
    config = gateway_yaml(objects)
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}

    def files(part: str) -> set[str]:
        volume = next(v for v in workloads[f"{FULL}-{part}"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "pki")
        return {f"{config['internal_tls']['dir']}/{item['path']}" for source in volume["projected"]["sources"]
                for item in source["secret"]["items"]}

    tls = config["state"]["etcd_tls"]
    assert files("control-plane") == {f"/etc/whisper-gateway/pki/{n}" for n in ("ca.pem", "control-plane.pem",
                                                                                 "control-plane.key")} | set(tls.values())
    assert files("envoy") == {f"/etc/whisper-gateway/pki/{n}" for n in ("ca.pem", "envoy-envoy.pem", "envoy-envoy.key")}
    etcd_flags = workloads[f"{FULL}-etcd"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert {flag for flag in etcd_flags if flag.startswith("/etc/whisper-gateway/pki/")} == files("etcd")
    envoy_args = workloads[f"{FULL}-envoy"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert envoy_args[envoy_args.index("--identity") + 1] == "envoy"
    assert envoy_args[envoy_args.index("--xds-host") + 1] == f"{FULL}-xds.{DOMAIN}"
    if file == "values-tls-cert-manager.yaml":
        certificates = by_kind(objects, "Certificate")
        assert certificates[f"{FULL}-envoy"]["spec"]["uris"] == ["spiffe://whisper-gateway/envoy/envoy"]
        assert certificates[f"{FULL}-control-plane"]["spec"]["uris"] == \
            ["spiffe://whisper-gateway/control-plane/control-plane"]
        assert f"{FULL}-admin.{DOMAIN}" in certificates[f"{FULL}-control-plane"]["spec"]["dnsNames"]
        assert {member.rsplit(":", 1)[0] for member in config["state"]["etcd"]} <= \
            set(certificates[f"{FULL}-etcd-member"]["spec"]["dnsNames"])
        assert config["listen"]["tls"] == {"cert_file": "/etc/whisper-gateway/certs/tls.crt",
                                           "key_file": "/etc/whisper-gateway/certs/tls.key"}


@pytest.mark.parametrize("file", VALUES_FILES)
def test_the_rendered_gateway_config_passes_whisper_gateway_check(file, tmp_path, capsys):
    raw = gateway_yaml(render(values(file)))
    assert config_problems(raw) == []
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_code:
        cli(["check", str(path)])
    assert exit_code.value.code == 0 and capsys.readouterr().out.strip() == f"{path}: ok"


def test_check_names_every_problem_and_exits_1(tmp_path, capsys):
    path = tmp_path / "gateway.yaml"
    path.write_text("models: [m]\nlisten: {port: 70000, bogus: 1}\nrouting: {scrape_interval_s: x}\n")
    with pytest.raises(SystemExit) as exit_code:
        cli(["check", str(path)])
    said = capsys.readouterr().err.splitlines()
    assert exit_code.value.code == 1
    assert said[0] == f"{path}: listen.port: 70000 is out of range 1..65535"
    assert said[1].startswith(f"{path}: listen.bogus: unknown key (allowed: address,")
    assert said[2] == f"{path}: routing.scrape_interval_s: expected a number, got 'x'"
    path.write_text("models: [m, m]\nlisten: {address: 0.0.0.0}\n")  # sections pass; checks across them do not
    with pytest.raises(SystemExit):
        cli(["check", str(path)])
    said = capsys.readouterr().err
    assert "models[1].name: 'm' is already used" in said and "auth.api_keys: off while listen.address" in said
    with pytest.raises(SystemExit) as exit_code:
        cli(["check", str(tmp_path / "missing.yaml")])
    assert exit_code.value.code == 1 and "cannot read config" in capsys.readouterr().err


def test_the_dashboard_is_deploy_grafanas():
    source = (REPO / "deploy" / "grafana" / "dashboards" / "whisper-gateway.json").read_text()
    assert (CHART / "dashboards" / "whisper-gateway.json").read_text() == source  # Helm reads only the chart's folder
    dashboard = by_kind(render(values("values-gpu.yaml")), "ConfigMap")[f"{FULL}-dashboard"]
    assert json.loads(dashboard["data"]["whisper-gateway.json"]) == json.loads(source)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.e2e
@pytest.mark.parametrize("file", VALUES_FILES)
def test_envoys_bootstrap_from_the_rendered_config_passes_envoy_validate(file, tmp_path):
    objects = render(values(file))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_yaml(objects)))
    args = by_kind(objects, "Deployment")[f"{FULL}-envoy"]["spec"]["template"]["spec"]["containers"][0]["args"]
    result = subprocess.run([PYTHON, "-m", "control_plane", "check", str(path), "--envoy",
                             "--xds-host", args[args.index("--xds-host") + 1]],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and "Envoy's bootstrap validated" in result.stdout, result.stderr


class Dns:
    """A nameserver on loopback answering one name (the engines' headless Service) with 127.0.0.1."""

    def __init__(self, name: str):
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                if request.q.qtype == QTYPE.A and str(request.q.qname) == name + ".":
                    reply.add_answer(RR(name + ".", QTYPE.A, rdata=A("127.0.0.1"), ttl=1))
                return reply
        self.port = free_port()
        self.server = DNSServer(Resolver(), port=self.port, address="127.0.0.1", logger=DNSLogger("-request,-reply"))
        self.server.start_thread()


def _secret(objects: list[dict], name: str) -> str:
    data = by_kind(objects, "Secret")[name]["data"]
    return base64.b64decode(next(iter(data.values()))).decode()


@pytest.mark.e2e
def test_the_rendered_control_plane_and_envoy_answer_a_transcription(tmp_path):
    """values-cpu.yaml's control plane and Envoy, run here with the arguments, config, Secrets and
    probes the chart gives them; the engine behind the headless Service is a simulated one that
    the gateway finds by DNS (a nameserver here answers the Service's name)."""
    objects = render(values("values-cpu.yaml"))
    raw = gateway_yaml(objects)
    raw["listen"].update(port=free_port(), envoy_metrics_port=free_port(), xds_port=free_port(),
                         admin_port=free_port(), envoy_admin_port=free_port())
    listen = raw["listen"]
    raw["longform"].update(socket_dir=socket_dir())  # the pod's /tmp/whisper-gateway, here beside other tests' own
    discovered = raw["discovery"][0]
    dns = Dns(discovered["name"])
    engine_key = _secret(objects, f"{FULL}-engine-api-key")
    engine_process, engine = start_engine(tmp_path, discovered["models"][0], "k8s-engine", api_key=engine_key)
    discovered.update(port=int(engine.rsplit(":", 1)[1]), nameserver=f"127.0.0.1:{dns.port}", interval_s=0.2)
    raw["internal_tls"]["dir"] = str(tmp_path / "pki")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    # The internal TLS Secret's files, made as values.yaml tells the operator to make them.
    made = subprocess.run([PYTHON, "-m", "control_plane", "certs", "init", "--dir", str(tmp_path / "pki"),
                           "--host", f"{FULL}-admin", "--envoy", "envoy"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert made.returncode == 0, made.stderr
    (tmp_path / "envoy-tmp").mkdir()  # the pod's /tmp: Envoy watches the folder of its certificate's SDS file
    (tmp_path / "admin-token").write_text(_secret(objects, f"{FULL}-admin-token"))

    deployments = by_kind(objects, "Deployment")

    def host_command(name: str) -> tuple[list[str], dict]:
        container = deployments[f"{FULL}-{name}"]["spec"]["template"]["spec"]["containers"][0]
        mapped = {"/etc/whisper-gateway/gateway.yaml": str(config), "/var/lib/whisper-gateway": str(tmp_path / "state"),
                  "/tmp/bootstrap.yaml": str(tmp_path / "envoy-tmp" / "bootstrap.yaml"), f"{FULL}-xds.{DOMAIN}": "127.0.0.1",
                  "/etc/whisper-gateway/admin-token/token": str(tmp_path / "admin-token")}
        env = {e["name"]: mapped.get(e["value"], e["value"]) for e in container["env"] if "value" in e}
        env |= {e["name"]: engine_key for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        return [PYTHON, "-m", "control_plane"] + [mapped.get(a, a) for a in container["args"]], env

    envoy_command, envoy_env = host_command("envoy")
    envoy = Process("envoy", envoy_command, tmp_path, env=envoy_env)  # first: pods start in any order
    plane_command, plane_env = host_command("control-plane")
    plane = Process("control-plane", plane_command, tmp_path, env=plane_env)
    ca = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
    admin = f"https://127.0.0.1:{listen['admin_port']}"
    token = {"Authorization": f"Bearer {_secret(objects, f'{FULL}-admin-token')}", "Content-Type": "application/json"}
    try:
        # The probes the chart gives the kubelet pass: /healthz (HTTPS), Envoy's /health.
        wait_until(lambda: request("GET", admin + "/healthz", timeout=2, context=ca).status == 200, 30, "the plane")
        wait_until(lambda: request("GET", f"http://127.0.0.1:{listen['envoy_metrics_port']}/health",
                                   timeout=2).status == 200, 30, "Envoy's /health")
        wait_until(lambda: engine in [b["url"] for b in request("GET", admin + "/backends", headers=token,
                                                                 context=ca).json()["data"]], 30, "DNS discovery")
        key = request("POST", admin + "/keys", json.dumps({"name": "k8s"}).encode(), token, context=ca).json()["secret"]
        base = f"http://127.0.0.1:{listen['port']}"
        answer = wait_until(lambda: (r := transcribe(base, "whisper-1", headers={"Authorization": f"Bearer {key}"}))
                            .status == 200 and r, 30, "a transcription through Envoy")
        assert "k8s-engine" in answer.json()["text"]
        # A recording over 180 s: split by the worker the Envoy container started beside Envoy, once
        # Envoy's health checks found it up.
        worker = worker_socket(raw["longform"]["socket_dir"], 0)
        wait_until(lambda: f"whisper:longform::{worker}::health_flags::healthy" in request(
            "GET", f"http://127.0.0.1:{listen['envoy_admin_port']}/clusters", timeout=2).text, 20, "the worker")
        recording = transcribe(base, "whisper-1", 200.0, headers={"Authorization": f"Bearer {key}"})
        assert recording.status == 200, recording.text
        assert recording.json()["text"].count(" k8s-engine transcribed chunk 1 of 1 ") == 8  # 27.5 s each (silence), and the rest
        assert transcribe(base, "whisper-1").status == 401  # api_keys: required, as rendered
    finally:
        for process in (envoy, plane, engine_process):
            process.stop()
        dns.server.stop()
