"""The desired state the builders turn into Envoy resources: models and the engines serving them."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Fleet:
    models: tuple[ModelConfig, ...]
    backends: tuple[Backend, ...]

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
