"""The resolved fleet, the desired state the builders turn into Envoy resources: models and the engines serving them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from control_plane.addresses import is_https
from control_plane.config import ModelConfig


@dataclass(frozen=True)
class Backend:
    """One engine endpoint as Envoy will dial it (an IP address: EDS does not resolve names)."""

    id: str
    address: str
    port: int
    models: tuple[str, ...]
    weight: int = 1
    draining: bool = False
    url: str = ""
    # The name an https:// engine's certificate must carry, sent as SNI: the URL's host, or the
    # DNS name it was discovered under.
    host: str = ""

    @property
    def endpoint(self) -> str:
        """"ip:port", as Envoy names the host (its try log, control_plane/observe/outcomes.py)."""
        return f"{self.address}:{self.port}"

    @property
    def tls(self) -> bool:
        """An https:// engine: Envoy and the scrapes speak TLS to it, checked against its host name."""
        return is_https(self.url)



@dataclass(frozen=True)
class Fleet:
    models: tuple[ModelConfig, ...]
    backends: tuple[Backend, ...]
    # Load-derived weights by (backend id, model); an endpoint without one uses its base weight.
    weights: dict[tuple[str, str], int] = field(default_factory=dict)
    # Endpoints that take long uploads, by (backend id, model); a model with none: all take them.
    long_uploads: frozenset[tuple[str, str]] = frozenset()
    # Endpoints taken out for failing their answers (decide/ejection.py): EDS UNHEALTHY.
    ejected: frozenset[tuple[str, str]] = frozenset()
    # Models whose engines are backed up, refusing batch keys -> the Retry-After (s) they give.
    batch_closed: dict[str, int] = field(default_factory=dict)
    # Models whose speed is measured -> a try's deadline in ms per audio-second (decide/hedging.py).
    hedge_ms: dict[str, int] = field(default_factory=dict)
    # Models -> how many of one long recording's pieces may be at their engines at once
    # (decide/longform.py); a model without one: all of its engines' slots.
    longform_parallel: dict[str, int] = field(default_factory=dict)

    def with_routing(self, weights: dict[tuple[str, str], int], long_uploads: frozenset[tuple[str, str]],
                     ejected: frozenset[tuple[str, str]] | None = None) -> "Fleet":
        """This fleet with load-derived weights, long-upload marks and ejections (None: as they
        are), kept only for its own endpoints."""
        keep = self.endpoint_keys()
        return replace(self, weights={k: w for k, w in weights.items() if k in keep},
                       long_uploads=frozenset(long_uploads) & keep,
                       ejected=frozenset(self.ejected if ejected is None else ejected) & keep)

    def weight(self, backend: Backend, model: str) -> int:
        return self.weights.get((backend.id, model), backend.weight)

    def endpoint_keys(self) -> set[tuple[str, str]]:
        return {(b.id, model) for b in self.backends for model in b.models}

    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def backends_for(self, model: str) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if model in b.models)

    def name_to_model(self) -> dict[str, str]:
        """Every name a client may send (model names and aliases) to the model it means."""
        names = {m.name: m.name for m in self.models}
        for m in self.models:
            names.update({alias: m.name for alias in m.aliases})
        return names
