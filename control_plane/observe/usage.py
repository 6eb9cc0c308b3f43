"""Usage for billing: per UTC day, API key and model, what was metered (observe/ledger.py's
figures: requests, audio-seconds received, served, failed, refused, corrected, mismatches).

Each control-plane process keeps the days it metered, cumulative since it started, and writes
them as its own record per day (fleet/usage_store.py: the state dir, or etcd beside the shared
state) every USAGE_FLUSH_S. A record is the writer's alone, so writers never contend and a
restart only adds a record: a day's usage is the sum of every record of that day, over every
control plane and every process each ran. A request's day is when its Envoy started it. Pure.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta, timezone

# How often each process writes its records: what a control plane killed outright loses at most
# (a stopped one writes at once); each write is the whole day's record of every key it metered.
USAGE_FLUSH_S = 5.0
# A record's figures, by the name it holds each under -> the ledger's Metered field.
_FIELD_OF = {"requests": "requests", "audio_received_s": "received", "audio_served_s": "served",
             "audio_failed_s": "failed", "audio_refused_s": "refused", "audio_estimated_s": "estimated",
             "audio_corrected_s": "corrected", "mismatches": "mismatches"}
FIGURES = tuple(_FIELD_OF)


def utc_day(wall: float) -> tuple[date, int]:
    """The UTC day of epoch second `wall` (what usage is counted in), and the epoch second it ends."""
    day = datetime.fromtimestamp(wall, timezone.utc).date()
    return day, int(datetime.combine(day + timedelta(days=1), datetime.min.time(), timezone.utc).timestamp())


def figures(metered) -> dict:
    """A day's figures of one key and model, as a record holds them."""
    return {name: getattr(metered, field) for name, field in _FIELD_OF.items()}


class UsageBook:
    """This process's metering by (day, key id, model), and which days changed since they were
    last written; `make`: a new entry (observe/ledger.py's Metered)."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make
        self.days: dict[str, dict[tuple[str, str], object]] = {}
        self.changed: set[str] = set()

    def entry(self, day: str, key: str, model: str):
        self.changed.add(day)
        entries = self.days.setdefault(day, {})
        if (key, model) not in entries:
            entries[(key, model)] = self.make()
        return entries[(key, model)]

    def record(self, day: str) -> dict:
        """The day as this writer's record: {key id: {model: figures}}."""
        out: dict[str, dict[str, dict]] = {}
        for (key, model), metered in sorted(self.days.get(day, {}).items()):
            out.setdefault(key, {})[model] = figures(metered)
        return out

    def take_changed(self) -> list[str]:
        changed, self.changed = sorted(self.changed), set()
        return changed

    def forget_before(self, day: str) -> None:
        for old in [d for d in self.days if d < day]:
            del self.days[old]


def _number(value) -> float:
    """A figure read back from a record: a finite number (a damaged record counts 0). A writer's
    figures may be negative: a correction logged to one plane, its request's audio to another."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else 0.0


def summed(records: Mapping[str, Iterable[dict]], key: str | None = None) -> list[dict]:
    """{day: [record, ...]} (every writer's) -> one row per day, key and model, in that order;
    `key`: that key's rows alone."""
    rows: dict[tuple[str, str, str], dict] = {}
    for day, day_records in records.items():
        for record in day_records:
            for key_id, models in (record or {}).items():
                if key is not None and key_id != key or not isinstance(models, dict):
                    continue
                for model, counts in models.items():
                    row = rows.setdefault((day, key_id, model), {name: 0.0 for name in FIGURES})
                    for name in FIGURES:
                        row[name] += _number((counts or {}).get(name))
    return [{"day": day, "key": key_id, "model": model,
             **{name: (int(value) if name in ("requests", "mismatches") else round(value, 3))
                for name, value in row.items()}}
            for (day, key_id, model), row in sorted(rows.items())]


def as_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["day", "key", "model", *FIGURES], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

