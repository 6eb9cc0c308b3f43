"""Every backend the gateway knows, where it came from, and whether it takes new requests.

Sources: `config` (the YAML file, including engines `up` starts), `api` (added at runtime) and
`dns:<name>` (discovered). The config file owns its backends: the API may drain and resume them
but not delete them. What the API changes (its backends, models it introduced, drain states)
is what the state file keeps.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

ACTIVE, DRAINING, DRAINED = "active", "draining", "drained"


def backend_id(url: str) -> str:
    """Short, stable, URL-safe: the same URL always gets the same id."""
    return "b-" + hashlib.sha256(url.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Entry:
    id: str
    url: str
    models: tuple[str, ...]
    weight: int = 1
    source: str = "config"
    state: str = ACTIVE
    drain_deadline: float | None = None  # wall-clock seconds; a drain ends by then whatever happens
    drain_reason: str | None = None  # "admin", or "dns" when its record vanished

    @classmethod
    def create(cls, url: str, models, weight: int = 1, source: str = "config") -> "Entry":
        return cls(id=backend_id(url), url=url, models=tuple(models), weight=weight, source=source)

    def to_json(self) -> dict:
        return asdict(self) | {"models": list(self.models)}

    @classmethod
    def from_json(cls, data: dict) -> "Entry":
        return cls(**{**data, "models": tuple(data["models"])})  # older files lack drain_reason: default


@dataclass(frozen=True)
class DrainState:
    state: str
    deadline: float | None = None
    reason: str = "admin"


@dataclass
class Registry:
    config_entries: dict[str, Entry]
    api_entries: dict[str, Entry]
    dns_entries: dict[str, Entry]
    api_models: list[str]
    overrides: dict[str, DrainState]  # drain states of config and DNS backends

    @classmethod
    def empty(cls) -> "Registry":
        return cls({}, {}, {}, [], {})

    def entries(self) -> list[Entry]:
        merged = []
        for entry in [*self.config_entries.values(), *self.dns_entries.values()]:
            override = self.overrides.get(entry.id)
            merged.append(replace(entry, state=override.state, drain_deadline=override.deadline,
                                  drain_reason=override.reason) if override else entry)
        return merged + list(self.api_entries.values())

    def get(self, entry_id: str) -> Entry | None:
        return next((e for e in self.entries() if e.id == entry_id), None)

    def find_url(self, url: str) -> Entry | None:
        return next((e for e in self.entries() if e.url == url), None)

    def set_state(self, entry_id: str, state: str, deadline: float | None = None, reason: str = "admin") -> None:
        if entry_id in self.api_entries:
            self.api_entries[entry_id] = replace(self.api_entries[entry_id], state=state, drain_deadline=deadline,
                                                 drain_reason=None if state == ACTIVE else reason)
        elif state == ACTIVE:
            self.overrides.pop(entry_id, None)
        else:
            self.overrides[entry_id] = DrainState(state, deadline, reason)

    def remove(self, entry_id: str) -> None:
        """API and vanished DNS backends go for good; config ones leave rotation until resumed."""
        self.overrides.pop(entry_id, None)
        if entry_id in self.api_entries:
            gone = self.api_entries.pop(entry_id)
            # A model the API introduced goes with its last backend: 404 again, not 503 for ever.
            still_served = {m for e in self.api_entries.values() for m in e.models}
            self.api_models = [m for m in self.api_models if m not in gone.models or m in still_served]
        elif entry_id in self.dns_entries:
            del self.dns_entries[entry_id]
        else:
            self.overrides[entry_id] = DrainState(DRAINED)

    # -- what the state file keeps -----------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "version": 1,
            "models": list(self.api_models),
            "backends": [e.to_json() for e in self.api_entries.values()],
            "drains": {i: asdict(d) for i, d in self.overrides.items()},
        }

    def restore(self, data: dict) -> None:
        if data.get("version") != 1:
            raise ValueError(f"unknown state file version {data.get('version')!r}")
        self.api_models = [str(m) for m in data.get("models", [])]
        self.api_entries = {e.id: e for e in (Entry.from_json(b) for b in data.get("backends", []))}
        self.overrides = {i: DrainState(**d) for i, d in data.get("drains", {}).items()}
