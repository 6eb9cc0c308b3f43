"""API keys on the audio listener and the plans that limit them."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, YAML_OFF, EnvName, RotationGrace, seconds
from control_plane.validation import matching, within

PlanName = Annotated[StrictStr, matching(re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
                                         "{!r} is not a valid plan name (1-64 characters: letters, digits, . _ -)")]


@dataclass(frozen=True, config=SECTION)
class PlanConfig:
    """A key's limits, each the key's whole budget however many Envoys it reaches: the per-minute
    ones enforced in every Envoy by its quota filters (builders/quotas.py), the day's by the
    control plane from the durable usage (decide/budgets.py)."""

    # Envoy's buckets are 32-bit and hold BUDGET_SCALE tokens a unit, hence the bounds.
    requests_per_minute: Annotated[StrictInt, within(1, 10_000_000)]
    # Each upload costs its duration, rounded up to a whole second (envoy/audio_duration.lua).
    audio_seconds_per_minute: Annotated[StrictInt, within(1, 16_000_000)]
    # A UTC calendar day's audio-seconds (received, less refused: what engines were sent).
    audio_seconds_per_day: Annotated[StrictInt, within(1, 4_000_000_000)] | None = None
    # At most this many of the key's requests at once (counted by the control plane, enforced in
    # every Envoy: builders/quotas.py); null: no limit.
    requests_in_flight: Annotated[StrictInt, within(1, 100_000)] | None = None


@dataclass(frozen=True, config=SECTION)
class AuthConfig:
    """API keys on the audio listener (control_plane/tenants/keys.py, envoy/api_keys.lua)."""

    # required: every audio request needs `Authorization: Bearer <key>` (keys made with
    # `whisper-gateway keys create`); off: anyone who can reach listen.address may send audio.
    api_keys: Annotated[Literal["off", "required"], YAML_OFF] = "off"
    # Lets api_keys: off serve a listen.address beyond loopback; without it that is refused, so
    # nothing is open by accident.
    open_listener: StrictBool = False
    max_keys: Annotated[StrictInt, within(1, 100_000)] = 1000
    # How long a rotated key's previous secret keeps working, unless a rotation says otherwise.
    rotation_grace_s: RotationGrace = 86400.0
    # The environment variable holding the engines' own --api-key (vLLM's): Envoy sends it to
    # them in place of whatever the client sent. Unset: with keys required, the client's key is
    # removed before any engine sees it; with keys off, it reaches the engines as sent.
    engine_api_key_env: EnvName | None = None
    # Named limits a key can have (`whisper-gateway keys create NAME --plan P`); default_plan is
    # the plan of keys made without one (null: those keys have no limits).
    plans: dict[PlanName, PlanConfig] = Field(default_factory=dict)
    default_plan: PlanName | None = None
    # Batch keys get 429 while a model's expected wait for a new 30 s clip is above this (the
    # autoscaling number, docs/operations.md), so interactive ones keep flowing; null: never.
    batch_above_wait_s: seconds(0.05, 3600) | None = None
    # At most this many batch requests per serving engine in flight on each model, all batch keys
    # together; over it, batch requests get 429 (builders/quotas.py); null: no such cap.
    batch_in_flight_per_engine: Annotated[StrictInt, within(1, 1000)] | None = None
    # A client address that sent this many wrong API keys within bad_key_window_s gets 429 for
    # every request without a valid key until the window ends; a valid key still passes (counted
    # by each Envoy worker thread; 0: never).
    bad_keys_per_address: Annotated[StrictInt, within(0, 1_000_000)] = 20
    bad_key_window_s: seconds(1, 3600) = 10.0
