"""Long recordings' share of a model's engines: all of their slots while no short clip waits at the
model (a recording fills the room there is), longform.max_share of them while clips wait (they do
not queue behind pieces), and never more than the clips' waits leave (levels: halved each round
clips queue, grown by one a round while they do not), shared by the recordings at the model. Pure.

A model is busy from the round its engines hold a client's request with requests queued until
HOLD_S after the last round that saw it, so the share does not flap with every clip.
"""

from __future__ import annotations

from collections.abc import Mapping

from control_plane.config.longform import LongformConfig
from control_plane.observe.ledger import UNKNOWN_MODEL

HOLD_S = 5.0


def clips_waiting(clients_in_flight: Mapping[str, float], waiting: Mapping[str, float]) -> set[str]:
    """The models where short clips wait now: their engines hold a client's own audio and have
    requests queued (waiting, as their metrics say). Pieces alone queued are no one's wait."""
    return {model for model, seconds in clients_in_flight.items() if seconds > 0 and waiting.get(model, 0) > 0}


def seen_busy(last_seen: Mapping[str, float], clients_in_flight: Mapping[str, float], waiting: Mapping[str, float],
              now: float) -> dict[str, float]:
    """Each model -> the last time short clips were waiting at it (clips_waiting), brought up to
    `now`; models not seen so for HOLD_S are forgotten."""
    seen = dict.fromkeys(clips_waiting(clients_in_flight, waiting), now)
    return {model: at for model, at in (dict(last_seen) | seen).items() if now - at <= HOLD_S}


def levels(settings: LongformConfig, last: Mapping[str, float], models: set[str] | frozenset[str],
           waiting: set[str] | frozenset[str]) -> dict[str, float]:
    """Each model -> how many pieces per engine its recordings may hold together, given last
    round's: halved in a round where clips wait at the model (the pieces already there are what
    they wait behind), one more in a round where none do, between one and pieces_per_engine. So
    recordings take the room the clips leave and give it back as soon as clips queue."""
    top = float(settings.pieces_per_engine)
    return {model: max(1.0, last.get(model, top) / 2) if model in waiting else min(top, last.get(model, top) + 1.0)
            for model in models}


def pieces_at_once(settings: LongformConfig, engines: Mapping[str, int], busy: set[str] | frozenset[str],
                   recordings: Mapping[str, int], level: Mapping[str, float] | None = None) -> dict[str, int]:
    """Each model -> how many of one recording's pieces may be at its engines at once (at most
    `level` per engine: levels); a recording of a model not known here (UNKNOWN_MODEL) counts at
    every model."""
    unknown = recordings.get(UNKNOWN_MODEL, 0)
    return {model: settings.parallel(n, model in busy, recordings.get(model, 0) + unknown, (level or {}).get(model))
            for model, n in engines.items()}
