"""Named admin tokens with roles: who may read or change the fleet through the admin API.

Kept as API keys are (control_plane/tenants/keys.py): the secret is shown once, when the token
is made, and only its SHA-256 is stored, in the same durable state as the keys (the state file,
or etcd where control planes share it). The token the control plane starts with
(WHISPER_GATEWAY_ADMIN_TOKEN, its file, or the one generated into the state dir) is not stored
here: it is the `admin` called "bootstrap" (BOOTSTRAP).

Roles rank viewer < operator < admin; each admin route names the least one it needs
(control_plane/operator/admin.py, ROUTE_ROLES).

Pure: no I/O; time and randomness are passed in.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from control_plane.tenants.keys import NAME_PATTERN, KeyProblem, digest, new_id, new_secret

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)  # each may do what the ones before it may
BOOTSTRAP = "bootstrap"  # the name of the token the control plane starts with (an admin)
SECRET_PREFIX = "wg-admin-"  # not an API key's sk-wg-: a secret scanner tells them apart
ID_PREFIX = "tok-"
MAX_ACTIVE_TOKENS = 1000
ACTIVE, REVOKED = "active", "revoked"


def allows(role: str, needed: str) -> bool:
    """Whether `role` may do what `needed` may."""
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class AdminToken:
    id: str
    name: str
    role: str
    created_at: float
    sha256: str = field(repr=False)
    revoked_at: float | None = None

    @property
    def state(self) -> str:
        return REVOKED if self.revoked_at is not None else ACTIVE

    def to_json(self) -> dict:
        """As the API (and the audit trail) shows it: neither secret nor digest."""
        return {"id": self.id, "name": self.name, "role": self.role, "created_at": self.created_at,
                "state": self.state, "revoked_at": self.revoked_at}

    def to_state(self) -> dict:
        return self.to_json() | {"sha256": self.sha256}

    @classmethod
    def from_state(cls, data: dict) -> "AdminToken":
        if data["role"] not in ROLES:
            raise ValueError(f"admin token {data['id']}: unknown role {data['role']!r}")
        return cls(id=data["id"], name=data["name"], role=data["role"], created_at=float(data["created_at"]),
                   sha256=data["sha256"], revoked_at=data.get("revoked_at"))


@dataclass
class TokenTable:
    by_id: dict[str, AdminToken] = field(default_factory=dict)

    def get(self, token_id: str) -> AdminToken:
        if token_id not in self.by_id:
            raise KeyProblem(404, f"no admin token with id {token_id!r}", "id")
        return self.by_id[token_id]

    def active(self) -> list[AdminToken]:
        return [t for t in self.by_id.values() if t.revoked_at is None]

    def find(self, secret: str) -> AdminToken | None:
        """The active token whose secret this is; every digest compared in constant time."""
        given = digest(secret)
        found = None
        for token in self.active():
            if hmac.compare_digest(given, token.sha256):
                found = token
        return found

    def create(self, name: str, role: str, now: float, make_secret: Callable[[], str] | None = None,
               make_id: Callable[[], str] | None = None) -> tuple[AdminToken, str]:
        """A new token and its secret (which only this answer ever shows)."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise KeyProblem(400, f"name: {name!r} is not a valid token name (1-64 characters: letters, digits, "
                                  ". _ -, starting with a letter or digit)", "name")
        if name == BOOTSTRAP or name.startswith(ID_PREFIX):
            raise KeyProblem(400, f"name: {name!r} is reserved (the token the control plane starts with, or "
                                  "what ids look like)", "name")
        if role not in ROLES:
            raise KeyProblem(400, f"role: expected one of {', '.join(ROLES)}, got {role!r}", "role")
        for other in self.active():
            if other.name == name:
                raise KeyProblem(409, f"name: an active token is already called {name!r} ({other.id})", "name")
        if len(self.active()) >= MAX_ACTIVE_TOKENS:
            raise KeyProblem(409, f"there are already {MAX_ACTIVE_TOKENS} active admin tokens: revoke one")
        secret = (make_secret or (lambda: new_secret(SECRET_PREFIX)))()
        make_id = make_id or (lambda: new_id(ID_PREFIX))
        token_id = make_id()
        while token_id in self.by_id:
            token_id = make_id()
        token = AdminToken(token_id, name, role, now, digest(secret))
        self.by_id[token_id] = token
        return token, secret

    def revoke(self, token_id: str, now: float) -> AdminToken:
        """The token stops working at once; its record stays (the audit trail names it)."""
        token = self.get(token_id)
        if token.revoked_at is not None:
            raise KeyProblem(409, f"{token_id} is already revoked", "id")
        self.by_id[token_id] = replace(token, revoked_at=now, sha256="")  # nothing left to match
        return self.by_id[token_id]

    def to_state(self) -> list[dict]:
        return [t.to_state() for t in self.by_id.values()]

    @classmethod
    def from_state(cls, items: list[dict]) -> "TokenTable":
        return cls({item["id"]: AdminToken.from_state(item) for item in items})
