"""API keys: who may send audio, as records the admin API changes and Envoy checks.

A key's secret is shown once, when it is made (or rotated), and kept only as its SHA-256: the
state file, Envoy's config and every log hold digests and ids, never a secret. Envoy's Lua
filter hashes the client's bearer token and looks the digest up (envoy/api_keys.lua), so no
request calls the control plane. Secrets are 256 random bits, so an unsalted fast hash is as
safe as a slow one here: there is nothing to guess.

Pure: no I/O; time and randomness are passed in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

from pydantic import StrictStr

from control_plane.validation import matching

SECRET_PREFIX = "sk-wg-"  # looks like what the OpenAI SDK expects; says whose key it is
KeyClass = Literal["interactive", "batch"]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # use fullmatch
# A key's or an admin token's name as a type: the admin API's document shows its pattern (operator/openapi.py).
Name = Annotated[StrictStr, matching(NAME_PATTERN, "{!r} is not a valid name (1-64 characters: letters, digits, "
                                                   ". _ -, starting with a letter or digit)")]
ACTIVE, REVOKED = "active", "revoked"


class KeyProblem(ValueError):
    """A key change that cannot be made, said as the admin API answers it."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str = SECRET_PREFIX) -> str:
    """256 random bits after `prefix` (admin tokens use their own: control_plane/operator/tokens.py)."""
    return prefix + secrets.token_urlsafe(32)


def new_id(prefix: str = "key-") -> str:
    return prefix + secrets.token_hex(6)


@dataclass(frozen=True)
class Secret:
    """One valid secret of a key, by digest; a rotated-out one until `expires_at` (epoch s)."""

    sha256: str
    expires_at: float | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    secrets: tuple[Secret, ...] = ()
    models: tuple[str, ...] = ()  # empty: every model
    key_class: KeyClass = "interactive"
    revoked_at: float | None = None
    plan: str | None = None  # its limits (auth.plans); None: auth.default_plan

    @property
    def state(self) -> str:
        return REVOKED if self.revoked_at is not None else ACTIVE

    def to_json(self) -> dict:
        """As the API shows it and the state file keeps it: digests, never a secret."""
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "state": self.state,
                "revoked_at": self.revoked_at, "models": list(self.models) or None, "class": self.key_class,
                "plan": self.plan,
                "secrets": [{"sha256_prefix": s.sha256[:8], "expires_at": s.expires_at} for s in self.secrets]}

    def to_state(self) -> dict:
        return self.to_json() | {"secrets": [{"sha256": s.sha256, "expires_at": s.expires_at} for s in self.secrets]}

    @classmethod
    def from_state(cls, data: dict) -> "ApiKey":
        return cls(id=data["id"], name=data["name"], created_at=float(data["created_at"]),
                   secrets=tuple(Secret(s["sha256"], s.get("expires_at")) for s in data.get("secrets", [])),
                   models=tuple(data.get("models") or ()), key_class=data.get("class", "interactive"),
                   revoked_at=data.get("revoked_at"), plan=data.get("plan"))


@dataclass(frozen=True)
class Budget:
    """What the control plane decides of a key's budget for every Envoy (decide/budgets.py): what
    each charges per request and per audio-second, in BUDGET_SCALE tokens of the key's per-minute
    buckets (None: the Lua filter's default, the Envoys' count), and a limit that refuses the key
    until an epoch second."""

    requests_charge: int | None = None
    audio_charge: int | None = None
    refused: str | None = None  # the limit's name (x-whisper-limited)
    refused_until: int = 0

    def to_context(self) -> dict:
        return ({"requests_charge": self.requests_charge} if self.requests_charge is not None else {}) \
            | ({"audio_charge": self.audio_charge} if self.audio_charge is not None else {}) \
            | ({"refused": self.refused, "refused_until": self.refused_until} if self.refused else {})


@dataclass(frozen=True)
class Grant:
    """What Envoy learns of a key: its id, the models it may use (None: all), its plan (None: no
    limits), its lane and its budget's state."""

    id: str
    models: tuple[str, ...] | None
    plan: str | None = None
    key_class: KeyClass = "interactive"
    budget: Budget = Budget()

    def to_context(self) -> dict:
        return ({"id": self.id} | ({"models": list(self.models)} if self.models is not None else {})
                | ({"plan": self.plan} if self.plan is not None else {})
                | ({"class": self.key_class} if self.key_class != "interactive" else {})
                | (self.budget.to_context() if self.plan is not None else {}))


def plan_of(key: ApiKey, plans: frozenset[str] | set[str], default_plan: str | None) -> str | None:
    """A key's plan: its own, or `default_plan` when it has none or its own is no longer among `plans`."""
    plan = key.plan if key.plan in plans else default_plan  # a plan the config dropped: the default
    return plan if plan in plans else None


@dataclass
class KeyTable:
    by_id: dict[str, ApiKey] = field(default_factory=dict)

    def get(self, key_id: str) -> ApiKey:
        if key_id not in self.by_id:
            raise KeyProblem(404, f"no API key with id {key_id!r}", "id")
        return self.by_id[key_id]

    def active(self) -> list[ApiKey]:
        return [k for k in self.by_id.values() if k.revoked_at is None]

    def _check_name(self, name: str, except_id: str | None = None) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise KeyProblem(400, f"name: {name!r} is not a valid key name (1-64 characters: letters, digits, . _ -, "
                                 "starting with a letter or digit)", "name")
        if name.startswith("key-"):  # what ids look like: the CLI takes either
            raise KeyProblem(400, f"name: {name!r} starts with 'key-', which only key ids do", "name")
        for other in self.active():
            if other.name == name and other.id != except_id:
                raise KeyProblem(409, f"name: an active key is already called {name!r} ({other.id})", "name")

    def create(self, name: str, models: tuple[str, ...], key_class: KeyClass, now: float, max_keys: int,
               plan: str | None = None, make_secret: Callable[[], str] = new_secret,
               make_id: Callable[[], str] = new_id) -> tuple[ApiKey, str]:
        """A new key and its secret (which only this answer ever shows)."""
        self._check_name(name)
        if len(self.active()) >= max_keys:
            raise KeyProblem(409, f"there are already {max_keys} active keys (auth.max_keys): revoke one, or raise "
                                 "the limit")
        secret, key_id = make_secret(), make_id()
        while key_id in self.by_id:
            key_id = make_id()
        key = ApiKey(key_id, name, now, (Secret(digest(secret)),), tuple(models), key_class, plan=plan)
        self.by_id[key_id] = key
        return key, secret

    def rotate(self, key_id: str, grace_s: float, now: float,
               make_secret: Callable[[], str] = new_secret) -> tuple[ApiKey, str]:
        """A new secret; the ones before stay valid for `grace_s` (0: they end now)."""
        key = self._active(key_id)
        secret = make_secret()
        kept = tuple(replace(s, expires_at=min(s.expires_at or now + grace_s, now + grace_s))
                     for s in key.secrets if grace_s > 0)
        self.by_id[key_id] = replace(key, secrets=(Secret(digest(secret)),) + kept)
        return self.by_id[key_id], secret

    def revoke(self, key_id: str, now: float) -> ApiKey:
        """Every secret of the key stops working; the record stays, for its usage."""
        key = self._active(key_id)
        self.by_id[key_id] = replace(key, secrets=(), revoked_at=now)
        return self.by_id[key_id]

    def update(self, key_id: str, name: str | None = None, models: tuple[str, ...] | None = None,
               key_class: KeyClass | None = None, plan: str | None = None) -> ApiKey:
        key = self._active(key_id)
        if name is not None:
            self._check_name(name, except_id=key_id)
        self.by_id[key_id] = replace(key, name=key.name if name is None else name,
                                     models=key.models if models is None else tuple(models),
                                     key_class=key.key_class if key_class is None else key_class,
                                     plan=key.plan if plan is None else (plan or None))  # "": the default
        return self.by_id[key_id]

    def _active(self, key_id: str) -> ApiKey:
        key = self.get(key_id)
        if key.revoked_at is not None:
            raise KeyProblem(409, f"{key_id} is revoked; make a new key", "id")
        return key

    def expire(self, now: float) -> bool:
        """Drops rotated-out secrets whose grace ended; True if any did."""
        changed = False
        for key in self.active():
            kept = tuple(s for s in key.secrets if s.expires_at is None or s.expires_at > now)
            if kept != key.secrets:
                self.by_id[key.id], changed = replace(key, secrets=kept), True
        return changed

    def next_expiry(self) -> float | None:
        ends = [s.expires_at for k in self.active() for s in k.secrets if s.expires_at is not None]
        return min(ends) if ends else None

    def grants(self, plans: frozenset[str] | set[str] = frozenset(), default_plan: str | None = None
               ) -> dict[str, Grant]:
        """Every valid secret's digest -> its key's grant: the table Envoy checks. A key's plan is
        its own, or `default_plan` when it has none or its own is no longer among `plans`."""
        return {s.sha256: Grant(k.id, k.models or None, plan_of(k, plans, default_plan), k.key_class)
                for k in self.active() for s in k.secrets}

    def plans(self, plans: frozenset[str] | set[str], default_plan: str | None = None) -> dict[str, str]:
        """Each active key with a plan: key id -> its plan's name, as its grants name it."""
        return {k.id: plan for k in self.active() if (plan := plan_of(k, plans, default_plan)) is not None}

    def to_state(self) -> list[dict]:
        return [k.to_state() for k in self.by_id.values()]

    @classmethod
    def from_state(cls, items: list[dict]) -> "KeyTable":
        return cls({item["id"]: ApiKey.from_state(item) for item in items})


@dataclass(frozen=True)
class Access:
    """What the builders turn into Envoy's key check: whether keys are required, the grants by
    digest, and the engines' own key (sent to them in place of the client's; never printed)."""

    required: bool = False
    grants: dict[str, Grant] = field(default_factory=dict)
    engine_key: str | None = field(default=None, repr=False)
