"""Reads the few numbers routing needs from an engine's Prometheus page, cheaply.

A vLLM page is ~50 kB, mostly histograms we never use; a full Prometheus parse of it costs
milliseconds, which a control plane scraping many engines several times a second cannot pay.
So one regular expression anchored on the wanted names picks their samples out of the page,
and nothing else is parsed (about 0.05 ms for a real 50 kB page, against 7 ms for a full parse).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_OLD = "vllm:gpu_cache_usage_perc"  # engines before vLLM V1
INFERENCE_SUM = "vllm:request_inference_time_seconds_sum"
INFERENCE_COUNT = "vllm:request_inference_time_seconds_count"
_WANTED = (RUNNING, WAITING, KV_CACHE, KV_CACHE_OLD, INFERENCE_SUM, INFERENCE_COUNT)
# A wanted name at a line start, its labels, its value. The name must end there:
# `vllm:num_requests_waiting_by_reason` is not `vllm:num_requests_waiting`.
_SAMPLE = re.compile(r"\n(" + "|".join(re.escape(n) for n in _WANTED) + r")(\{[^}\n]*\})?[ \t]+(\S+)")
_MODEL_LABEL = re.compile(r'model_name="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ModelLoad:
    """One model's load on one engine, summed over its data-parallel ranks (`engine` label)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # mean over ranks, 0..1
    inference_seconds: float = 0.0  # counter: time engine requests spent running
    inference_count: float = 0.0  # counter: engine requests that finished running


def parse_loads(page: str) -> dict[str, ModelLoad]:
    """Loads by `model_name` label ("" for rows without one)."""
    samples: dict[str, dict[str, list[float]]] = {}
    for name, labels, raw_value in _SAMPLE.findall("\n" + page):
        try:
            value = float(raw_value)
        except ValueError:
            continue
        model_match = _MODEL_LABEL.search(labels)
        samples.setdefault(model_match.group(1) if model_match else "", {}).setdefault(name, []).append(value)
    loads = {}
    for model, by_name in samples.items():
        kv = by_name.get(KV_CACHE) or by_name.get(KV_CACHE_OLD) or [0.0]
        loads[model] = ModelLoad(
            running=sum(by_name.get(RUNNING, ())),
            waiting=sum(by_name.get(WAITING, ())),
            kv_cache_usage=sum(kv) / len(kv),
            inference_seconds=sum(by_name.get(INFERENCE_SUM, ())),
            inference_count=sum(by_name.get(INFERENCE_COUNT, ())),
        )
    return loads


def load_for_model(loads: dict[str, ModelLoad], model: str) -> ModelLoad | None:
    """The rows of `model`; an engine serving one model under another name still counts."""
    if model in loads:
        return loads[model]
    if len(loads) == 1:
        return next(iter(loads.values()))
    return None
