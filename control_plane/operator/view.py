"""What the operator's side (the admin API, /status, /metrics) may ask of the running control
plane, and the changes it may make: PlaneView, and nothing else of it.

The plane (control_plane/app.py) drives operator/ and hands it an object of this shape
(control_plane/plane/operator_view.py); operator/ never imports the plane, so what it reads is
written down here rather than taken from the plane's attributes. Answers are the plane's current
objects: read them, never change them (a change goes through one of the actions at the end,
which save it and publish it whole).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:  # hints only: nothing of these runs here
    import ssl

    from control_plane.config import GatewayConfig
    from control_plane.fleet.registry import Entry
    from control_plane.fleet.resolved import Fleet
    from control_plane.observe.ledger import Metered
    from control_plane.observe.load_tracker import EndpointState, Track
    from control_plane.operator.tokens import AdminToken, TokenTable
    from control_plane.tenants.keys import ApiKey, KeyTable
    from control_plane.xds.cache import EnvoyStatus

T = TypeVar("T")


class AuditTrail(Protocol):
    """The admin changes' trail (control_plane/operator/audit.py: a file, etcd, or memory)."""

    async def append(self, record: dict) -> None: ...

    async def read(self, since: str | None, limit: int) -> tuple[list[dict], bool]: ...


class PlaneView(Protocol):
    # -- what it was told and serves

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def fleet(self) -> Fleet | None:
        """The fleet last published (None before the first)."""

    def backends(self) -> list[Entry]:
        """Every backend of the registry, drained ones included."""

    def backend(self, backend_id: str) -> Entry | None: ...

    def backend_at(self, url: str) -> Entry | None: ...

    def api_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones included."""

    def api_key(self, key_id: str) -> ApiKey:
        """The key; KeyProblem (404) when there is none."""

    # -- who may call the admin API, and where its changes are written down

    @property
    def bootstrap_token(self) -> str | None:
        """The token the plane started with (the state dir's, or the environment's)."""

    def admin_tokens(self) -> Mapping[str, AdminToken]:
        """The named admin tokens by id, revoked ones included."""

    def admin_token_for(self, secret: str) -> AdminToken | None:
        """The active named token whose secret this is (compared in constant time)."""

    @property
    def audit(self) -> AuditTrail: ...

    # -- what it knows of the engines it reaches

    @property
    def engine_key(self) -> str | None:
        """The engines' own --api-key (auth.engine_api_key_env), for reading a new one's models."""

    @property
    def engine_tls(self) -> ssl.SSLContext | None:
        """The TLS https:// engines are reached with."""

    def serves_https_engines(self) -> bool:
        """Whether there is a CA to check https:// engines against."""

    # -- what it observed (control_plane/observe/), per endpoint (a backend's model), model and key

    def scrape(self, backend_id: str, model: str) -> Track | None:
        """The endpoint's scrapes: its last load, speed, when, and the last error."""

    def endpoint_state(self, backend_id: str, model: str, base_weight: int, now: float) -> EndpointState:
        """What the policy knows of one endpoint from its scrapes."""

    def endpoint_states(self, now: float) -> dict[str, list[EndpointState]]:
        """The policy's whole input, by model (control_plane/observe/scraper.py)."""

    def ejected_until(self, backend_id: str, model: str) -> float | None:
        """Out of rotation for failing its answers until then (decide/ejection.py); None: in."""

    def failure_ratio(self, endpoint: str, now: float) -> float: ...

    def audio_in_flight(self, endpoint: str) -> float: ...

    def audio_rate(self, endpoint: str, now: float) -> float | None: ...

    def metered(self, model: str) -> Metered | None: ...

    def metered_by_key(self) -> Mapping[tuple[str, str], Metered]:
        """(key id, model) -> what was metered; key "" is requests made without a key."""

    def usage_of(self, key_id: str) -> dict[str, dict]:
        """A key's metering per model, as the admin API shows it."""

    async def usage(self, first: str, last: str, key_id: str | None) -> list[dict]:
        """Usage for billing: per UTC day from `first` to `last` (YYYY-MM-DD), key and model,
        summed over every control plane's records (observe/usage.py); `key_id`: that key's alone."""

    def budget_of(self, key_id: str) -> dict:
        """A key's budget across the Envoys as last published: what each charges per unit (times
        its cost; absent: the Envoys' count) and a refusal with its end (epoch s)."""

    def requests_in_flight(self, group: str) -> int:
        """Of a key, or of a model's batch lane (names.batch_lane)."""

    def requests_in_flight_by_group(self) -> dict[str, int]:
        """Groups with requests in flight -> how many."""

    def in_flight_limits(self) -> Mapping[str, int]:
        """Limited groups -> this plane's share of their requests_in_flight limit."""

    def no_slot_free(self, group: str) -> bool:
        """Whether this plane holds no free slot for the group (the Envoys then hold none for it)."""

    # -- what it serves the Envoys, and how

    def envoys(self) -> list[EnvoyStatus]:
        """One per open ADS stream."""

    def served_versions(self) -> Mapping[str, str]:
        """Type URL -> the version served (empty before the first snapshot)."""

    def nacks_total(self) -> int: ...

    def certificate_status(self) -> dict:
        """The certificates served (never a key), and why replaced files are not."""

    def internal_tls_status(self) -> dict | None:
        """The xDS port's mutual TLS: its folder and why replaced files are not served; None without it."""

    def state_status(self) -> dict:
        """Where runtime changes live (file or etcd), the revision served, and who leads."""

    # -- the changes the admin API makes: each saved durably and published whole, or not at all

    async def add_backend(self, entry: Entry) -> Entry: ...

    async def drain(self, entry_id: str, timeout_s: float) -> Entry: ...

    async def resume(self, entry_id: str) -> Entry: ...

    async def remove_now(self, entry_id: str) -> None: ...

    async def change_keys(self, mutate: Callable[[KeyTable], T]) -> tuple[T, list[str]]:
        """What `mutate` returned, and the Envoys that had not applied the change when the wait ended."""

    async def change_tokens(self, mutate: Callable[[TokenTable], T]) -> T: ...
