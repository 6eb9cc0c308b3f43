"""Every backend the gateway knows: one record each, with where it came from and its drain.

Sources: the config file (including engines `up` starts), the admin API, and DNS discovery
(with the name). The config file owns its backends: the API may drain and resume them but not
delete them. What the state file keeps: API backends, the models they introduced, and the
drains of config and DNS backends (those backends are rebuilt from the file or from DNS, so a
drain of one not present right now is kept aside, in `parked`, until it is).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from control_plane.config import GatewayConfig

ACTIVE, DRAINING, DRAINED = "active", "draining", "drained"


class Source(str, Enum):
    CONFIG = "config"
    API = "api"
    DNS = "dns"


def backend_id(url: str) -> str:
    """Short, stable, URL-safe: the same URL always gets the same id."""
    return "b-" + hashlib.sha256(url.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Drain:
    state: str  # DRAINING, or DRAINED (config and DNS backends an operator parked)
    deadline: float | None = None  # wall-clock seconds; a drain ends by then whatever happens
    reason: str = "admin"  # or "dns" when its record vanished


@dataclass(frozen=True)
class Entry:
    """One backend: the one record the registry, the admin API, discovery and drains share."""

    id: str
    url: str
    models: tuple[str, ...]
    weight: int = 1
    source: Source = Source.CONFIG
    dns_name: str | None = None  # the DNS name it was discovered under
    drain: Drain | None = None  # None: active

    @classmethod
    def create(cls, url: str, models, weight: int = 1, source: Source = Source.CONFIG,
               dns_name: str | None = None) -> "Entry":
        return cls(id=backend_id(url), url=url, models=tuple(models), weight=weight, source=Source(source),
                   dns_name=dns_name)

    @property
    def state(self) -> str:
        return self.drain.state if self.drain else ACTIVE

    @property
    def drain_deadline(self) -> float | None:
        return self.drain.deadline if self.drain else None

    @property
    def drain_reason(self) -> str | None:
        return self.drain.reason if self.drain else None

    @property
    def origin(self) -> str:
        """How the API names the source: config, api, or dns:<name>."""
        return f"dns:{self.dns_name}" if self.source is Source.DNS else self.source.value

    def to_json(self) -> dict:
        return {"id": self.id, "url": self.url, "models": list(self.models), "weight": self.weight,
                "source": self.origin, "state": self.state, "drain_deadline": self.drain_deadline,
                "drain_reason": self.drain_reason}

    @classmethod
    def from_json(cls, data: dict) -> "Entry":
        """An API backend as the state file keeps it (older files lack drain_reason)."""
        state = data.get("state", ACTIVE)
        drain = None if state == ACTIVE else Drain(state, data.get("drain_deadline"), data.get("drain_reason") or "admin")
        return cls(id=data["id"], url=data["url"], models=tuple(data["models"]), weight=data.get("weight", 1),
                   source=Source.API, drain=drain)


def config_entries(config: GatewayConfig) -> list[Entry]:
    """Configured backends plus the engines `up` runs, as the registry keeps them."""
    given = [Entry.create(b.url, b.models, b.weight, Source.CONFIG) for b in config.backends]
    return given + [Entry.create(e.url, (e.model,), 1, Source.CONFIG) for e in config.engines]


@dataclass
class Registry:
    by_id: dict[str, Entry]
    api_models: list[str]
    parked: dict[str, Drain]  # drains of config and DNS backends that are not present right now

    @classmethod
    def empty(cls) -> "Registry":
        return cls({}, [], {})

    def entries(self) -> list[Entry]:
        """Config backends, then discovered ones, then API ones."""
        order = {Source.CONFIG: 0, Source.DNS: 1, Source.API: 2}
        return sorted(self.by_id.values(), key=lambda e: order[e.source])

    def get(self, entry_id: str) -> Entry | None:
        return self.by_id.get(entry_id)

    def find_url(self, url: str) -> Entry | None:
        return next((e for e in self.by_id.values() if e.url == url), None)

    def add(self, entry: Entry) -> None:
        """A backend joins; a config or DNS one takes up a drain kept for it."""
        if entry.source is not Source.API and entry.id in self.parked:
            entry = replace(entry, drain=self.parked.pop(entry.id))
        self.by_id[entry.id] = entry

    def set_config(self, entries: list[Entry]) -> None:
        """The config file's backends now; those that stay keep their drains, those that go keep them aside."""
        for entry in [e for e in self.by_id.values() if e.source is Source.CONFIG]:
            if entry.drain is not None:
                self.parked[entry.id] = entry.drain
            del self.by_id[entry.id]
        for entry in entries:
            self.add(entry)

    def set_state(self, entry_id: str, state: str, deadline: float | None = None, reason: str = "admin") -> None:
        entry = self.by_id[entry_id]
        self.by_id[entry_id] = replace(entry, drain=None if state == ACTIVE else Drain(state, deadline, reason))

    def remove(self, entry_id: str) -> None:
        """API and vanished DNS backends go for good; config ones leave rotation until resumed."""
        entry = self.by_id[entry_id]
        if entry.source is Source.CONFIG:
            self.by_id[entry_id] = replace(entry, drain=Drain(DRAINED))
            return
        del self.by_id[entry_id]
        if entry.source is Source.API:
            # A model the API introduced goes with its last backend: 404 again, not 503 for ever.
            still_served = {m for e in self.by_id.values() if e.source is Source.API for m in e.models}
            self.api_models = [m for m in self.api_models if m not in entry.models or m in still_served]

    # -- what the state file keeps -----------------------------------------------------------

    def to_json(self) -> dict:
        drains = dict(self.parked)
        drains.update({e.id: e.drain for e in self.by_id.values() if e.source is not Source.API and e.drain})
        return {
            "version": 1,
            "models": list(self.api_models),
            "backends": [e.to_json() | {"source": "api"} for e in self.by_id.values() if e.source is Source.API],
            # What DNS discovery found (its leader's records, control_plane/plane/state_keeper.py): control planes
            # that share the state serve the same engines; one alone finds them again anyway.
            "discovered": [{"url": e.url, "models": list(e.models), "weight": e.weight, "dns_name": e.dns_name}
                           for e in self.by_id.values() if e.source is Source.DNS],
            "drains": {i: {"state": d.state, "deadline": d.deadline, "reason": d.reason} for i, d in drains.items()},
        }

    def restore(self, data: dict) -> None:
        if data.get("version") != 1:
            raise ValueError(f"unknown state file version {data.get('version')!r}")
        self.api_models = [str(m) for m in data.get("models", [])]
        for entry in (Entry.from_json(b) for b in data.get("backends", [])):
            self.by_id[entry.id] = entry
        for found in data.get("discovered", []):
            entry = Entry.create(found["url"], found["models"], found.get("weight", 1), Source.DNS, found["dns_name"])
            self.by_id[entry.id] = entry
        self.parked = {i: Drain(**d) for i, d in data.get("drains", {}).items()}
        for entry in [e for e in self.by_id.values() if e.source is not Source.API and e.id in self.parked]:
            self.by_id[entry.id] = replace(entry, drain=self.parked.pop(entry.id))
