"""The control plane's own Prometheus metrics, served at the admin API's /metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from control_plane.names import is_batch_lane
from control_plane.observe.ledger import OUTCOMES
from control_plane.operator.status import endpoint_rows, model_rows
from control_plane.operator.view import PlaneView
from control_plane.xds.cache import NoCallbacks
from control_plane.xds.types import SHORT_NAMES

REGISTRY = CollectorRegistry()

SCRAPE_SECONDS = Histogram(
    "whisper_gateway_scrape_duration_seconds", "Time to fetch and parse one engine's /metrics.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), registry=REGISTRY)
SCRAPE_FAILURES = Counter(
    "whisper_gateway_scrape_failures", "Engine /metrics fetches that failed or timed out.", ["backend"],
    registry=REGISTRY)
PUSHES = Counter("whisper_gateway_xds_pushes", "xDS responses sent to Envoys, by type.", ["type"], registry=REGISTRY)
PUSH_TO_ACK_SECONDS = Histogram(
    "whisper_gateway_xds_push_ack_seconds", "From publishing a version to an Envoy's ACK of it.", ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY)
NACKS = Counter("whisper_gateway_xds_nacks", "Configuration versions an Envoy rejected.", ["type"], registry=REGISTRY)
WEIGHT_UPDATES = Counter("whisper_gateway_weight_updates", "Endpoint-weight snapshots published.", registry=REGISTRY)
AUDIT_WRITE_FAILURES = Counter("whisper_gateway_audit_write_failures", "Admin changes applied whose audit record "
                               "could not be written (see the control plane's log).", registry=REGISTRY)
LOAD_ROUND_SECONDS = Histogram(
    "whisper_gateway_load_round_seconds",
    "One round of the load loop: every engine scraped, weights decided and published. Above "
    "routing.scrape_interval_s, rounds run back to back and weights age.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0), registry=REGISTRY)
DROP_LOG_EVERY_S = 10.0


class ReportsDropped:
    """What the Envoys reported and the plane did not take (an unknown model, key or engine, too
    many audio-seconds): a counter by source and reason, and a log line at most every
    DROP_LOG_EVERY_S per source, reason and peer, with the count since the last one."""

    def __init__(self) -> None:
        self.counter = Counter("whisper_gateway_reports_dropped",
                               "Entries of the Envoys' access logs and quota reports not taken as sent "
                               "(dropped, or audio-seconds cut to limits.max_audio_s), by source and reason.",
                               ["source", "reason"], registry=REGISTRY)
        self._pending: dict[tuple[str, str, str], tuple[int, float]] = {}  # -> (count unlogged, last logged)
        self.log = logging.getLogger("control_plane.reports")

    def on(self, source: str):
        def dropped(reason: str, peer: str) -> None:
            self.counter.labels(source, reason).inc()
            key = (source, reason, peer)
            count, last = self._pending.get(key, (0, 0.0))
            now = time.monotonic()
            if now - last >= DROP_LOG_EVERY_S:
                self.log.warning("%s from %s not taken: %s (%d time(s) since the last such line)", source, peer,
                                 reason, count + 1)
                self._pending[key] = (0, now)
                if len(self._pending) > 10_000:
                    self._pending.clear()
            else:
                self._pending[key] = (count + 1, last)
        return dropped


REPORTS_DROPPED = ReportsDropped()


class XdsMetrics(NoCallbacks):
    """The xDS layer's callbacks (control_plane/xds/cache.py) as Prometheus metrics."""

    def on_push(self, type_url: str) -> None:
        PUSHES.labels(SHORT_NAMES.get(type_url, type_url)).inc()

    def on_ack(self, type_url: str, version: str, node: str, push_to_ack_s: float | None) -> None:
        if push_to_ack_s is not None:
            PUSH_TO_ACK_SECONDS.labels(SHORT_NAMES.get(type_url, type_url)).observe(push_to_ack_s)

    def on_nack(self, type_url: str, version: str, node: str, message: str) -> None:
        NACKS.labels(SHORT_NAMES.get(type_url, type_url)).inc()


def on_scrape(backend, seconds: float, failed: bool) -> None:
    """The scrape step's callback (control_plane/observe/scraper.py)."""
    SCRAPE_SECONDS.observe(seconds)
    if failed:
        SCRAPE_FAILURES.labels(backend.id).inc()


class FleetCollector:
    """Per-endpoint gauges read from the running control plane (operator/view.py) at scrape time."""

    def __init__(self, plane: PlaneView):
        self.plane = plane

    def collect(self):
        envoys = GaugeMetricFamily("whisper_gateway_connected_envoys", "Envoys with an open ADS stream.")
        envoys.add_metric([], len(self.plane.envoys()))
        yield envoys
        if self.plane.fleet is None:
            return
        labels = ["backend", "url", "model"]
        families = {
            "weight": GaugeMetricFamily("whisper_gateway_endpoint_weight", "Weight published to Envoy.", labels=labels),
            "running": GaugeMetricFamily("whisper_gateway_endpoint_running", "Engine requests running.", labels=labels),
            "waiting": GaugeMetricFamily("whisper_gateway_endpoint_waiting", "Engine requests waiting.", labels=labels),
            "kv_cache_usage": GaugeMetricFamily("whisper_gateway_endpoint_kv_cache_usage", "KV-cache use, 0..1.",
                                                labels=labels),
            "audio_in_flight_s": GaugeMetricFamily("whisper_gateway_endpoint_audio_in_flight_seconds",
                                                   "Audio-seconds sent to the engine and not yet answered.", labels=labels),
            "audio_rate": GaugeMetricFamily("whisper_gateway_endpoint_audio_rate",
                                            "Audio-seconds the engine answers per second of being busy.", labels=labels),
        }
        healthy = GaugeMetricFamily("whisper_gateway_endpoint_metrics_fresh",
                                    "1 when the engine's metrics are fresh, else 0.", labels=labels)
        draining = GaugeMetricFamily("whisper_gateway_endpoint_draining", "1 while draining or drained.", labels=labels)
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return
        rows = endpoint_rows(self.plane, now)
        for row in rows:
            key = [row["id"], row["url"], row["model"]]
            for name, family in families.items():
                if row[name] is not None:
                    family.add_metric(key, row[name])
            healthy.add_metric(key, 1 if row["health"] == "ok" else 0)
            draining.add_metric(key, 0 if row["state"] == "active" else 1)
        yield from families.values()
        yield healthy
        yield draining
        yield from self._models(model_rows(self.plane, rows, now))
        yield from self._keys()

    def _keys(self):
        """Per API key (its id: never a secret) and model: requests and audio-seconds, by outcome;
        key "" is requests made without a key. Summed over keys they are the models' totals.
        The key's id is a label only with metrics.key_labels: true (/metrics is open, and ids
        tell who uses the gateway how much); otherwise each family is summed over the keys,
        with the same names and no key label."""
        by_key = self.plane.config.metrics.key_labels
        key_label = ["key"] if by_key else []
        requests = CounterMetricFamily("whisper_gateway_key_requests", "Requests that ended, per API key (with "
                                       "metrics.key_labels) and model.", labels=key_label + ["model"])
        audio = CounterMetricFamily("whisper_gateway_key_audio_seconds", "Audio-seconds of requests that ended, per "
                                    "API key (with metrics.key_labels), model and outcome.",
                                    labels=key_label + ["model", "outcome"])
        totals: dict[tuple, list[float]] = {}  # (key?, model) -> requests, then each outcome's audio-seconds
        outcomes = ("received", *OUTCOMES)
        for (key, model), metered in sorted(self.plane.metered_by_key().items()):
            sums = totals.setdefault((key, model) if by_key else (model,), [0.0] * (1 + len(outcomes)))
            sums[0] += metered.requests
            for i, outcome in enumerate(outcomes, 1):
                sums[i] += getattr(metered, outcome)
        for labels, sums in totals.items():
            requests.add_metric(list(labels), sums[0])
            for i, outcome in enumerate(outcomes, 1):
                audio.add_metric([*labels, outcome], sums[i])
        yield requests
        yield audio
        in_flight = GaugeMetricFamily("whisper_gateway_key_requests_in_flight", "Requests in flight per API key "
                                      "(with metrics.key_labels; else of every key together), logged to this "
                                      "control plane.", labels=key_label)
        # A model's batch lane is not a key: whisper_gateway_model_batch_in_flight.
        counts = {key: count for key, count in sorted(self.plane.requests_in_flight_by_group().items())
                  if not is_batch_lane(key)}
        if by_key:
            for key, count in counts.items():
                in_flight.add_metric([key], count)
        else:
            in_flight.add_metric([], sum(counts.values()))
        yield in_flight

    def _models(self, rows: list[dict]):
        """Per model: metered audio-seconds (counters) and the backlog an autoscaler reads."""
        audio = CounterMetricFamily("whisper_gateway_audio_seconds", "Audio-seconds of requests that ended, by outcome "
                                    "(received = served + failed + refused by a quota).", labels=["model", "outcome"])
        estimated = CounterMetricFamily("whisper_gateway_audio_seconds_estimated", "Of the received audio-seconds, "
                                        "those estimated from the upload's size.", labels=["model"])
        corrected = CounterMetricFamily("whisper_gateway_audio_seconds_corrected", "What the engines' own figures "
                                        "added to the edge's (direction added) or took off it (removed); served = "
                                        "the outcome's counter + added - removed.", labels=["model", "direction"])
        mismatches = CounterMetricFamily("whisper_gateway_audio_mismatches", "Served requests whose container claimed "
                                         "less audio than it held, or whose engine measured it otherwise.",
                                         labels=["model"])
        gauges = {
            "backlog_audio_s": GaugeMetricFamily("whisper_gateway_model_backlog_audio_seconds",
                                                 "Audio-seconds sent to the model's engines and not yet answered.",
                                                 labels=["model"]),
            "drain_rate": GaugeMetricFamily("whisper_gateway_model_drain_rate",
                                            "Audio-seconds per second the model's engines answer when busy.",
                                            labels=["model"]),
            "expected_wait_s": GaugeMetricFamily("whisper_gateway_model_expected_wait_seconds",
                                                 "Seconds until a new 30 s clip would be answered: scale on this.",
                                                 labels=["model"]),
            "batch_in_flight": GaugeMetricFamily("whisper_gateway_model_batch_in_flight",
                                                 "Batch keys' requests in flight on the model (logged to this "
                                                 "control plane).", labels=["model"]),
        }
        for row in rows:
            for outcome in ("received", *OUTCOMES):  # the edge's figures: counters only grow
                edge = row[f"audio_{outcome}_s"] - (row["audio_corrected_s"] if outcome in ("received", "served") else 0)
                audio.add_metric([row["model"], outcome], round(edge, 3))
            estimated.add_metric([row["model"]], row["audio_estimated_s"])
            corrected.add_metric([row["model"], "added"], row["audio_corrected_added_s"])
            corrected.add_metric([row["model"], "removed"], row["audio_corrected_removed_s"])
            mismatches.add_metric([row["model"]], row["mismatches"])
            for name, family in gauges.items():
                if row[name] is not None:
                    family.add_metric([row["model"]], row[name])
        yield from (audio, estimated, corrected, mismatches)
        yield from gauges.values()


def watch_fleet(plane: PlaneView) -> FleetCollector:
    """Registers the per-endpoint gauges of `plane` (one control plane per process); what
    forget_fleet takes back."""
    collector = FleetCollector(plane)
    REGISTRY.register(collector)
    return collector


def forget_fleet(collector: FleetCollector | None) -> None:
    if collector is not None:
        REGISTRY.unregister(collector)


def render() -> bytes:
    return generate_latest(REGISTRY)
