"""The config file: what loads, and that every mistake names its key."""

from __future__ import annotations

import pytest
import yaml

from control_plane.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config
from control_plane.fleet.registry import config_entries
from harness.processes import REPO


def minimal(**extra) -> dict:
    raw = {"models": [{"name": "m", "aliases": ["alias"]}], "backends": [{"url": "http://10.0.0.1:8000", "models": ["m"]}]}
    raw.update(extra)
    return raw


def test_embedded_default_runs_two_cpu_whisper_engines():
    config = load_config()
    assert [(m.name, m.aliases) for m in config.models] == [("whisper-tiny.en", ("whisper-1",))]
    assert [e.kind for e in config.engines] == ["whisper_cpu", "whisper_cpu"]
    assert DEFAULT_CONFIG_PATH.exists()


def test_the_simulated_example_loads():
    config = load_config(REPO / "examples" / "simulated.yaml")
    assert [m.name for m in config.models] == ["whisper-large-v3-turbo", "whisper-small"]
    assert {b.models for b in config_entries(config)} == {("whisper-large-v3-turbo",), ("whisper-small",)}


def test_defaults_fill_what_is_not_given():
    config = parse_config(minimal())
    assert config.listen.port == 8080 and config.listen.xds_port == 18000
    assert config.timeouts.route_s == 600  # never Envoy's 15 s default
    assert config.limits.max_upload_bytes == 25 * 1024 * 1024
    assert config.backends[0].weight == 1 and config.backends[0].url.endswith(":8000")


def test_a_model_may_be_given_as_a_plain_name():
    config = parse_config({"models": ["m"], "backends": []})
    assert config.models[0].name == "m" and config.models[0].aliases == ()


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"models": []}, "models: at least one model is required"),
        (minimal(listen={"port": 0}), "listen.port: 0 is out of range"),
        (minimal(listen={"port": "80"}), "listen.port: expected an integer"),
        (minimal(listen={"port": 9000, "xds_port": 9000}), "listen: the ports must all differ"),
        (minimal(listen={"prot": 1}), "listen.prot: unknown key"),
        (minimal(bakends=[]), "bakends: unknown key"),
        (minimal(timeouts={"route_s": -1}), "timeouts.route_s: -1 is out of range"),
        (minimal(limits={"max_upload_mb": "big"}), "limits.max_upload_mb: expected a number"),
        (minimal(limits={"max_upload_mb": 100, "max_longform_mb": 50}, longform={"workers": 1}),
         "limits.max_longform_mb: 50 is less than limits.max_upload_mb (100)"),
        (minimal(longform={"workers": ["127.0.0.1:8093"]}), "longform.workers: is a count now (the workers beside each "
                                                             "Envoy; they listen on Unix sockets in longform.socket_dir)"),
        (minimal(longform={"workers": 65}), "longform.workers: 65 is out of range 0..64"),
        (minimal(longform={"socket_dir": "run/wg"}), "longform.socket_dir: 'run/wg': expected an absolute path"),
        (minimal(longform={"socket_dir": "/" + "d" * 92}), "is too long for a Unix socket's path: at most 92 characters"),
        (minimal(longform={"pieces_port": 8092}), "longform.pieces_port: unknown key"),
        ({"models": [{"aliases": []}]}, "models[0].name: required"),
        ({"models": [{"name": "bad name"}]}, "models[0].name: 'bad name' is not a valid model name"),
        ({"models": ["m", "m"]}, "models[1].name: 'm' is already used by model 'm'"),
        ({"models": ["m", {"name": "n", "aliases": ["m"]}]}, "models[1].aliases[0]: 'm' is already used by model 'm'"),
        (minimal(backends=[{"url": "http://h:1", "models": ["x"]}]), "backends[0].models[0]: 'x' is not a model name"),
        (minimal(backends=[{"url": "http://h:1"}]), "backends[0].models: list the models"),
        (minimal(backends=[{"url": "ftp://h:1", "models": ["m"]}]), "must start with http://"),
        (minimal(backends=[{"url": "https://h:1/v1", "models": ["m"]}]), "must be scheme://host:port with no path"),
        (minimal(listen={"tls": {"cert_file": "c.pem"}}), "listen.tls.key_file: required"),
        (minimal(listen={"tls": {"cert_file": "c", "key_file": "k", "client_certificates": "required"}}),
         "listen.tls.client_ca_file: give it exactly when"),
        (minimal(listen={"tls": {"cert_file": "c", "key_file": "k", "client_certificates": "maybe"}}),
         "listen.tls.client_certificates"),
        (minimal(backend_tls={"cert_file": "c"}), "backend_tls: cert_file and key_file go together"),
        (minimal(listen={"admin_address": "0.0.0.0"}), "listen.admin_address 0.0.0.0 is reachable beyond this host"),
        (minimal(discovery=[{"name": "e", "port": 1, "models": ["m"], "scheme": "ftp"}]), "discovery[0].scheme"),
        (minimal(discovery=[{"name": "engine", "port": 8000, "models": ["x"]}]), "discovery[0].models[0]: 'x' is not"),
        (minimal(discovery=[{"name": "bad name!", "port": 8000, "models": ["m"]}]), "discovery[0].name: expected a DNS"),
        (minimal(discovery=[{"name": "e", "port": 8000, "models": ["m"], "nameserver": "dns:53"}]),
         "discovery[0].nameserver: expected IP:port"),
        (minimal(discovery=[{"name": "e", "models": ["m"]}]), "discovery[0].port: required"),
        (minimal(backends=[{"url": "http://u:p@h:1", "models": ["m"]}]), "must not carry user info"),
        (minimal(backends=[{"url": "http://h", "models": ["m"]}]), "needs an explicit port"),
        (minimal(backends=[{"url": "http://h:99999", "models": ["m"]}]), "has an invalid port"),
        (minimal(backends=[{"url": "http://h:1/v1", "models": ["m"]}]), "with no path"),
        (minimal(backends=[{"url": "http://h:1", "models": ["m"], "weight": 0}]), "backends[0].weight: 0 is out of range"),
        (minimal(backends=[{"url": "http://h:1", "models": ["m"]}, {"url": "http://h:1", "models": ["m"]}]),
         "http://h:1 is listed twice"),
        (minimal(engines=[{"kind": "gpu", "port": 1, "model": "m"}]), "engines[0].kind: expected one of"),
        (minimal(engines=[{"kind": "simulated", "model": "m"}]), "engines[0].port: required"),
        (minimal(engines=[{"kind": "simulated", "port": 1, "model": "m", "speeed": 2}]), "engines[0].speeed: unknown key"),
        (minimal(engines=[{"kind": "simulated", "port": 1, "model": "m", "speed": -2}]), "engines[0].speed: expected a positive"),
        (minimal(engines=[{"kind": "whisper_cpu", "port": 1, "model": "m", "speed": 2}]), "engines[0].speed: unknown key"),
        (minimal(engines=[{"kind": "vllm", "port": 1, "model": "m"}]), "engines[0].model_path: required"),
        (minimal(engines=[{"kind": "vllm", "port": 1, "model": "m", "model_path": "x", "cpu": "yes"}]),
         "engines[0].cpu: expected true or false"),
        (minimal(engines=[{"kind": "whisper_cpu", "port": 1, "model": "m", "cpu_threads": 1.5}]),
         "engines[0].cpu_threads: expected an integer"),
        ("just a string", "config: expected a mapping"),
        (minimal(routing={"scrape_interval_s": 0.25, "scrape_timeout_s": 0.3}), "routing.scrape_timeout_s: 0.3 must be shorter"),
        (minimal(routing={"stale_after_s": 0.1}), "routing.stale_after_s: 0.1 must be at least"),
        (minimal(routing={"load_aware": "yes"}), "routing.load_aware: expected true or false"),
        (minimal(routing={"lb_policy": "random"}), "routing.lb_policy: expected one of least_request, round_robin"),
        (minimal(routing={"long_upload_kb": 0.5}), "routing.long_upload_kb: 0.5 is under 1 KB"),
        (minimal(routing={"hysteresis": 2}), "routing.hysteresis: 2 is out of range"),
        (minimal(routing={"interval": 1}), "routing.interval: unknown key"),
        (minimal(drain_timeout_s=0), "drain_timeout_s: 0 is out of range 1..86400"),  # the key as written
        (minimal(limits={"max_heap_mb": 10**5000}), "limits.max_heap_mb: a 5001-digit number is out of range"),
        (minimal(engines=[{"port": 1, "model": "m"}]), "engines[0].kind: required"),
        (minimal(engines=[{"kind": "simulated", "port": 1, "model": "m", "name": ""}]),
         "engines[0].name: expected a non-empty string"),
        (minimal(models=[{"name": "m", "alias": ["a"]}]), "models[0].alias: unknown key (allowed: aliases, name)"),
    ],
)
def test_mistakes_name_the_key_and_the_problem(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert message in str(caught.value)


def test_a_top_level_key_is_named_as_written():
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(drain_timeout_s="soon"))
    assert str(caught.value) == "drain_timeout_s: expected a number, got 'soon'"


def test_unreadable_and_invalid_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal()))
    assert load_config(good).models[0].aliases == ("alias",)


def test_backend_urls_have_one_spelling():
    from control_plane.config import BackendUrl, check

    assert check(BackendUrl, "http://Engine-A.Example:8000/", "url") == "http://engine-a.example:8000"


def test_tls_settings_read_as_yaml_writes_them():
    """`off` unquoted is YAML's false; it means off here, as for auth.api_keys."""
    import yaml

    raw = yaml.safe_load("models: [m]\nlisten:\n  tls: {cert_file: c.pem, key_file: k.pem, client_certificates: off}\n"
                         "  admin_address: 0.0.0.0\nbackend_tls: {ca_file: ca.pem}\n")
    config = parse_config(raw)
    assert config.listen.tls.client_certificates == "off" and config.admin_tls == ("c.pem", "k.pem")
    assert config.backend_tls.ca_file == "ca.pem"
    plain = parse_config(dict(raw, listen=dict(raw["listen"], admin_plaintext=True)))
    assert plain.admin_tls is None  # admin_plaintext keeps the admin API plain even with listen.tls


def test_etcd_members_are_host_port_pairs():
    config = parse_config({"models": ["m"], "state": {"etcd": ["10.0.0.1:2379", "etcd:2379"]}})
    assert config.state.etcd == ("10.0.0.1:2379", "etcd:2379") and config.state.prefix == "/whisper-gateway/"
    for bad, message in ((["etcd"], "expected host:port"), (["[::1]:2379"], "expected host:port"),
                         (["etcd:99999"], "expected host:port")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"models": ["m"], "state": {"etcd": bad}})
    with pytest.raises(ConfigError, match="state.prefix"):
        parse_config({"models": ["m"], "state": {"prefix": "no-slashes"}})
