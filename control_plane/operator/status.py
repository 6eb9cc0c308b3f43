"""What an operator sees: per endpoint its state, load, weight and metric freshness; per Envoy its versions.

`plane` is the running control plane as operator/view.py's PlaneView shows it."""

from __future__ import annotations

import time

from control_plane.decide.lanes import model_waits
from control_plane.names import batch_lane, is_batch_lane
from control_plane.decide.policy import is_fresh
from control_plane.observe.ledger import Metered
from control_plane.operator.view import PlaneView
from control_plane.xds.cache import LAGGING_AFTER_S
from control_plane.xds.types import SHORT_NAMES


def _health(track, state, routing) -> str:
    """From the scrapes: `ok` (fresh metrics), `stale`, `failing` (never answered), `unknown`."""
    if track is None:
        return "unknown"
    if is_fresh(state, routing):
        return "ok"
    if track.scraped_at is not None:
        return "stale"
    return "failing" if track.error else "unknown"


def endpoint_rows(plane: PlaneView, now: float) -> list[dict]:
    """One row per (backend, model), drained backends included."""
    fleet = plane.fleet
    in_fleet = {b.id: b for b in fleet.backends}
    rows = []
    for entry in plane.backends():
        for model in entry.models:
            track = plane.scrape(entry.id, model)
            load = track.load if track else None
            backend = in_fleet.get(entry.id)
            rows.append({
                "id": entry.id,
                "url": entry.url,
                "model": model,
                "source": entry.origin,
                "state": entry.state,
                "drain_deadline": entry.drain_deadline,
                "health": _health(track, plane.endpoint_state(entry.id, model, entry.weight, now), plane.config.routing),
                "running": load.running if load else None,
                "waiting": load.waiting if load else None,
                "kv_cache_usage": round(load.kv_cache_usage, 4) if load else None,
                "seconds_per_request": round(track.seconds_per_request, 4) if track and track.seconds_per_request else None,
                "weight": fleet.weight(backend, model) if backend else None,
                "long_uploads": (entry.id, model) in fleet.long_uploads,
                # Out of rotation for failing its answers (decide/ejection.py), until this time.
                "ejected_until": plane.ejected_until(entry.id, model),
                "base_weight": entry.weight,
                "scrape_age_s": round(now - track.scraped_at, 3) if track and track.scraped_at is not None else None,
                "scrape_error": track.error if track else None,
                # Recent tries this engine failed (cut, reset, 502-504), as the Envoys saw them.
                "failure_ratio": round(plane.failure_ratio(backend.endpoint, now), 3) if backend else None,
                # Audio-seconds sent and not yet answered, over every Envoy; and how many it
                # answers per second of being busy (control_plane/observe/ledger.py).
                "audio_in_flight_s": round(plane.audio_in_flight(backend.endpoint), 3) if backend else None,
                "audio_rate": _rounded(plane.audio_rate(backend.endpoint, now)) if backend else None,
            })
    return rows


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def model_rows(plane: PlaneView, endpoints: list[dict], now: float) -> list[dict]:
    """Per model (with its `endpoint_rows`): audio-seconds metered, the backlog, the fleet's
    drain rate, and the expected wait for a new 30 s clip as the policy estimates it
    (`model_waits`: the number to autoscale on), and whether its
    batch lane is open (control_plane/decide/lanes.py)."""
    rows = []
    if plane.fleet is None:
        return rows
    waits = model_waits(plane.fleet, plane.endpoint_states(now), plane.config.routing)
    for model in plane.fleet.model_names():
        serving = [e for e in endpoints if e["model"] == model and e["state"] == "active" and e["weight"] is not None]
        metered = plane.metered(model) or Metered()
        rates = [e["audio_rate"] for e in serving if e["audio_rate"]]
        rows.append({
            "model": model,
            **metered.figures(),
            # For Prometheus's counters, which only grow: corrected = added - removed.
            "audio_corrected_added_s": round(metered.corrected_up, 3),
            "audio_corrected_removed_s": round(metered.corrected_down, 3),
            "audio_estimated_s": round(metered.estimated, 3),
            "longest_upload_s": round(metered.longest, 3),
            "backlog_audio_s": round(sum(e["audio_in_flight_s"] or 0.0 for e in serving), 3),
            "drain_rate": round(sum(rates), 3) if rates else None,
            "expected_wait_s": _rounded(waits[model]),
            "batch": "refused" if model in plane.fleet.batch_closed else "admitted",
            # A try's deadline before it is hedged, per audio-second of the upload (decide/hedging.py);
            # None: not measured yet (resilience.hedge_after_s + hedge_per_mb_s stand).
            "hedge_ms_per_audio_s": plane.fleet.hedge_ms.get(model),
            # With auth.batch_in_flight_per_engine: batch requests in flight, and how many may be.
            "batch_in_flight": plane.requests_in_flight(batch_lane(model)),
            "batch_in_flight_limit": plane.in_flight_limits().get(batch_lane(model)),
        })
    return rows


def key_rows(plane: PlaneView) -> list[dict]:
    """Per API key (by id and name; never a secret) and model: what was metered. Key "" is the
    requests made without a key (auth.api_keys off)."""
    names = {key.id: (key.name, key.state) for key in plane.api_keys()}
    rows = []
    for (key, model), metered in sorted(plane.metered_by_key().items()):
        name, state = names.get(key, ("(no key)" if key == "" else "(unknown)", None))
        rows.append({"key": key, "name": name, "state": state, "model": model, **metered.figures()})
    return rows


def in_flight_rows(plane: PlaneView) -> list[dict]:
    """Keys with requests in flight or a requests_in_flight limit: the count, this plane's share of
    the limit, and whether no slot is free on this plane (then the Envoys hold none for the key)."""
    counts, limits = plane.requests_in_flight_by_group(), plane.in_flight_limits()
    return [{"key": key, "in_flight": counts.get(key, 0), "limit": limits.get(key), "refused": plane.no_slot_free(key)}
            for key in sorted(set(counts) | set(limits)) if not is_batch_lane(key)]


def status_report(plane: PlaneView, now: float) -> dict:
    endpoints = endpoint_rows(plane, now)
    moment = time.monotonic()
    envoys = [{
        "node_id": envoy.node_id,
        "peer": envoy.peer,
        "identity": envoy.identity,  # the certificate it proved (internal TLS), or "local <address>"
        # Behind on a version for over LAGGING_AFTER_S: changes stop waiting for it (xds/cache.py).
        "lagging": envoy.lagging(moment, LAGGING_AFTER_S),
        "acked": {SHORT_NAMES[t]: v for t, v in envoy.acked.items()},
        "last_nack": None if envoy.last_nack is None else {
            "type": SHORT_NAMES.get(envoy.last_nack.type_url), "version": envoy.last_nack.version,
            "message": envoy.last_nack.message},
        # Resources this Envoy refused and still lacks: it serves its last good ones meanwhile.
        "rejected": [{"type": SHORT_NAMES.get(t), "resource": name, "version": nack.version,
                      "message": nack.message, "since": nack.at}
                     for (t, name), nack in sorted(envoy.rejected.items())],
    } for envoy in plane.envoys()]
    return {
        "endpoints": endpoints,
        "models": model_rows(plane, endpoints, now),
        "keys": key_rows(plane),
        "requests_in_flight": in_flight_rows(plane),
        "envoys": envoys,
        "versions": {SHORT_NAMES[t]: v for t, v in plane.served_versions().items()},
        "nacks_total": plane.nacks_total(),
        # The certificates served (subject, expiry, fingerprint) and why a replaced file is not.
        "certificates": plane.certificate_status(),
        # The xDS port's mutual TLS (internal_tls) and why replaced files are not served, if so.
        "internal_tls": plane.internal_tls_status(),
        # Where runtime changes live; with several control planes, which one leads.
        "state": plane.state_status(),
    }


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def render_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def render_table(report: dict) -> str:
    """The report as an aligned text table for a terminal."""
    header = ("ID", "URL", "MODEL", "STATE", "HEALTH", "RUNNING", "WAITING", "KV", "WEIGHT", "S/REQ", "AUDIO-S",
              "AUDIO-S/S", "FAILED", "AGE")
    rows = [(
        e["id"], e["url"], e["model"], e["state"], e["health"], _cell(e["running"]), _cell(e["waiting"]),
        _cell(e["kv_cache_usage"]), _cell(e["weight"]), _cell(e["seconds_per_request"], 3),
        _cell(e["audio_in_flight_s"], 1), _cell(e["audio_rate"], 1), _cell(e["failure_ratio"], 2),
        _cell(e["scrape_age_s"]),
    ) for e in report["endpoints"]]
    lines = render_rows(header, rows) + [""]
    models = [(m["model"], str(m["requests"]), _cell(m["audio_received_s"], 1), _cell(m["audio_served_s"], 1),
               _cell(m["audio_failed_s"], 1), _cell(m["backlog_audio_s"], 1), _cell(m["drain_rate"], 1),
               _cell(m["expected_wait_s"], 1), m.get("batch", "-")) for m in report.get("models", [])]
    if models:
        lines += render_rows(("MODEL", "REQUESTS", "RECEIVED-S", "SERVED-S", "FAILED-S", "BACKLOG-S", "DRAIN-S/S",
                              "WAIT-30S", "BATCH"), models) + [""]
    keys = [(k["key"] or "-", k["name"], k["model"], str(k["requests"]), _cell(k["audio_received_s"], 1),
             _cell(k["audio_served_s"], 1), _cell(k["audio_failed_s"], 1)) for k in report.get("keys", [])]
    if keys:
        lines += render_rows(("KEY", "NAME", "MODEL", "REQUESTS", "RECEIVED-S", "SERVED-S", "FAILED-S"), keys) + [""]
    for envoy in report["envoys"]:
        nack = envoy["last_nack"]
        lag = ", LAGGING" if envoy.get("lagging") else ""
        lines.append(f"envoy {envoy['node_id']} ({envoy.get('identity') or envoy['peer']}{lag}): "
                     + ", ".join(f"{t} {v}" for t, v in envoy["acked"].items())
                     + (f"; last NACK {nack['type']}: {nack['message']}" if nack else ""))
        for rejected in envoy["rejected"]:
            lines.append(f"  refused {rejected['type']} {rejected['resource']}: {rejected['message']}")
    if not report["envoys"]:
        lines.append("no Envoy connected")
    certificates = report.get("certificates") or {}
    for name, served in certificates.get("served", {}).items():
        lines.append(f"certificate {name}: " + (f"{served['subject']}, until {served['not_after']}" if "subject" in served
                                               else f"{served['certificates']} CA certificates from {served['file']}"))
    if certificates.get("problem"):
        lines.append(f"certificate files not served: {certificates['problem']}")
    return "\n".join(lines)
