"""What an operator sees: per endpoint load, weight and metric freshness; per Envoy its versions."""

from __future__ import annotations

from control_plane.fleet import Fleet
from control_plane.load_tracker import LoadTracker
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.types import SHORT_NAMES


def _health(track, stale_after_s: float, now: float) -> str:
    """From the scrapes: `ok` (fresh metrics), `stale`, `failing` (never answered), `unknown`."""
    if track is None:
        return "unknown"
    if track.scraped_at is not None and now - track.scraped_at <= stale_after_s:
        return "ok"
    if track.scraped_at is not None:
        return "stale"
    return "failing" if track.error else "unknown"


def status_report(fleet: Fleet, tracker: LoadTracker, cache: SnapshotCache, stale_after_s: float, now: float) -> dict:
    endpoints = []
    for backend in fleet.backends:
        for model in backend.models:
            track = tracker.tracks.get((backend.id, model))
            load = track.load if track else None
            endpoints.append({
                "backend": backend.id,
                "address": f"{backend.address}:{backend.port}",
                "model": model,
                "health": _health(track, stale_after_s, now),
                "running": load.running if load else None,
                "waiting": load.waiting if load else None,
                "kv_cache_usage": round(load.kv_cache_usage, 4) if load else None,
                "seconds_per_request": round(track.seconds_per_request, 4) if track and track.seconds_per_request else None,
                "weight": fleet.weight(backend, model),
                "base_weight": backend.weight,
                "draining": backend.draining,
                "scrape_age_s": round(now - track.scraped_at, 3) if track and track.scraped_at is not None else None,
                "scrape_error": track.error if track else None,
            })
    envoys = [{
        "node_id": envoy.node_id,
        "peer": envoy.peer,
        "acked": {SHORT_NAMES[t]: v for t, v in envoy.acked.items()},
        "last_nack": None if envoy.last_nack is None else {
            "type": SHORT_NAMES.get(envoy.last_nack.type_url), "version": envoy.last_nack.version,
            "message": envoy.last_nack.message},
    } for envoy in cache.envoys.values()]
    snapshot = cache.snapshot
    return {
        "endpoints": endpoints,
        "envoys": envoys,
        "versions": {SHORT_NAMES[t]: v for t, v in snapshot.versions.items()} if snapshot else {},
        "nacks_total": cache.nacks_total,
    }


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def render_table(report: dict) -> str:
    """The report as an aligned text table for a terminal."""
    header = ("BACKEND", "MODEL", "HEALTH", "RUNNING", "WAITING", "KV", "WEIGHT", "S/REQ", "AGE")
    rows = [header] + [(
        e["backend"] + (" (draining)" if e["draining"] else ""), e["model"], e["health"], _cell(e["running"]),
        _cell(e["waiting"]), _cell(e["kv_cache_usage"]), str(e["weight"]), _cell(e["seconds_per_request"], 3),
        _cell(e["scrape_age_s"]),
    ) for e in report["endpoints"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    for envoy in report["envoys"]:
        nack = envoy["last_nack"]
        lines.append(f"envoy {envoy['node_id']} ({envoy['peer']}): " + ", ".join(f"{t} {v}" for t, v in envoy["acked"].items())
                     + (f"; last NACK {nack['type']}: {nack['message']}" if nack else ""))
    if not report["envoys"]:
        lines.append("no Envoy connected")
    return "\n".join(lines)
