"""The scrape parser on real vLLM pages, old metric names, data-parallel ranks and several models."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.observe.metrics_parser import ModelLoad, load_for_model, parse_loads

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def test_real_busy_page():
    loads = parse_loads((FIXTURES / "metrics-busy.txt").read_text())
    assert list(loads) == ["whisper-tiny"]
    load = loads["whisper-tiny"]
    assert (load.running, load.waiting) == (2.0, 6.0)
    assert load.kv_cache_usage == pytest.approx(0.0073260073260073)
    # waiting_by_reason shares a prefix with waiting and must not be added to it
    assert "vllm:num_requests_waiting_by_reason" in (FIXTURES / "metrics-busy.txt").read_text()


def test_real_idle_page_has_the_speed_counters():
    load = parse_loads((FIXTURES / "metrics-idle.txt").read_text())["whisper-tiny"]
    assert (load.running, load.waiting) == (0.0, 0.0)
    assert load.inference_count == 37.0
    assert load.inference_seconds == pytest.approx(6.058998048999683)


@pytest.mark.parametrize("page", ["metrics-idle.txt", "metrics-busy.txt"])
def test_agrees_with_a_full_prometheus_parse(page):
    text = (FIXTURES / page).read_text()
    full = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            full[sample.name] = full.get(sample.name, 0.0) + sample.value
    load = parse_loads(text)["whisper-tiny"]
    assert load.running == full["vllm:num_requests_running"]
    assert load.waiting == full["vllm:num_requests_waiting"]
    assert load.kv_cache_usage == full["vllm:kv_cache_usage_perc"]
    assert load.inference_count == full["vllm:request_inference_time_seconds_count"]


OLD_ENGINE = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""

DATA_PARALLEL = """\
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
"""

TWO_MODELS = """\
vllm:num_requests_running{engine="0",model_name="a"} 1.0
vllm:num_requests_running{engine="0",model_name="b"} 5.0
vllm:num_requests_waiting{engine="0",model_name="b"} 2.0
"""


def test_old_metric_names():
    assert parse_loads(OLD_ENGINE)["m"] == ModelLoad(running=3.0, waiting=1.0, kv_cache_usage=0.5)


def test_data_parallel_ranks_are_summed_and_kv_averaged():
    load = parse_loads(DATA_PARALLEL)["m"]
    assert (load.running, load.waiting) == (6.0, 4.0)
    assert load.kv_cache_usage == pytest.approx(0.4)  # the V1 name wins over the old one


def test_only_the_clusters_model_counts():
    loads = parse_loads(TWO_MODELS)
    assert load_for_model(loads, "b") == ModelLoad(running=5.0, waiting=2.0)
    assert load_for_model(loads, "a").running == 1.0
    assert load_for_model(loads, "c") is None
    # A one-model engine that names its model differently is still that engine's load.
    assert load_for_model(parse_loads(OLD_ENGINE), "whisper-1").running == 3.0


@pytest.mark.parametrize("page", ["", "not prometheus at all\n", "vllm:num_requests_running{model_name=\"m\"} NaNx\n"])
def test_garbage_yields_nothing(page):
    assert load_for_model(parse_loads(page), "m") is None
