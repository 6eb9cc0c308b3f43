"""Long recordings' share of a model's engines: all of their slots while no short clip waits at the
model (a recording fills the room there is), longform.max_share of them while clips wait (they do
not queue behind pieces), shared by the recordings at the model. Pure.

A model is busy from the round its engines hold a client's request with requests queued until
HOLD_S after the last round that saw it, so the share does not flap with every clip.
"""

from __future__ import annotations

from collections.abc import Mapping

from control_plane.config.longform import LongformConfig
from control_plane.observe.ledger import UNKNOWN_MODEL

HOLD_S = 5.0


def seen_busy(last_seen: Mapping[str, float], clients_in_flight: Mapping[str, float], waiting: Mapping[str, float],
              now: float) -> dict[str, float]:
    """Each model -> the last time short clips were waiting at it: its engines held a client's own
    audio and had requests queued (waiting, as their metrics say), brought up to `now`; models
    not seen so for HOLD_S are forgotten. Pieces alone queued are no one's wait."""
    seen = {model: now for model, seconds in clients_in_flight.items() if seconds > 0 and waiting.get(model, 0) > 0}
    return {model: at for model, at in (dict(last_seen) | seen).items() if now - at <= HOLD_S}


def pieces_at_once(settings: LongformConfig, engines: Mapping[str, int], busy: set[str] | frozenset[str],
                   recordings: Mapping[str, int]) -> dict[str, int]:
    """Each model -> how many of one recording's pieces may be at its engines at once; a recording
    of a model not known here (UNKNOWN_MODEL) counts at every model."""
    unknown = recordings.get(UNKNOWN_MODEL, 0)
    return {model: settings.parallel(n, model in busy, recordings.get(model, 0) + unknown)
            for model, n in engines.items()}
