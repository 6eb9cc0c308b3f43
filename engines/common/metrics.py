"""vLLM V1's metric names, labels and types, so the control plane reads every engine alike.

Engines built here are scraped exactly as a real vLLM is: gauges for the queue, counters and
histograms per engine request (each 30 s chunk and each language detection is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets for its request-time histograms, copied from a real page.
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
LABELS = ("engine", "model_name")


@dataclass(frozen=True)
class EngineLoad:
    """What the scheduler holds right now, in engine requests (not HTTP requests)."""

    running: int
    waiting: int
    kv_cache_usage: float


class VllmMetrics:
    """One engine's `/metrics` page; the load gauges are read from the engine when scraped."""

    def __init__(self, model_name: str, read_load: Callable[[], EngineLoad], engine: str = "0"):
        self.registry = CollectorRegistry()
        self._labels = (engine, model_name)
        gauges = {
            "vllm:num_requests_running": ("Number of requests in model execution batches.", lambda: read_load().running),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed.", lambda: read_load().waiting),
            "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.", lambda: read_load().kv_cache_usage),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, LABELS, registry=self.registry).labels(*self._labels).set_function(read)
        self._success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            ("engine", "finished_reason", "model_name"), registry=self.registry,
        )
        for reason in ("stop", "length", "abort", "error", "repetition"):
            self._success.labels(engine, reason, model_name)
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=self.registry
        ).labels(*self._labels)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=self.registry
        ).labels(*self._labels)
        self._e2e = self._histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.")
        self._queue = self._histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."
        )
        self._inference = self._histogram(
            "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."
        )

    def _histogram(self, name: str, doc: str):
        return Histogram(name, doc, LABELS, buckets=LATENCY_BUCKETS, registry=self.registry).labels(*self._labels)

    def observe_engine_request(
        self, queue_s: float, inference_s: float, prompt_tokens: int, generation_tokens: int, reason: str = "stop"
    ) -> None:
        """Count one finished engine request the way vLLM's output processor does."""
        self._success.labels(self._labels[0], reason, self._labels[1]).inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(generation_tokens)
        self._queue.observe(queue_s)
        self._inference.observe(inference_s)
        self._e2e.observe(queue_s + inference_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
