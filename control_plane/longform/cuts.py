"""Where a long recording is cut into pieces: vLLM's own rule, moved above the engines.

vLLM cuts audio longer than its 30 s window at the quietest 0.1 s window in the last second before
each boundary, so no word is cut where a pause exists (vllm/entrypoints/openai/speech_to_text:
`_find_split_point`). The gateway cuts the same way, but looks back five seconds (SEARCH_S) and
cuts in the middle of the longest pause there (quietest), each piece then one engine request.
"""

from __future__ import annotations

import io
import sys
import wave
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RATE = 16_000  # what pieces are sent as: 16 kHz mono, 16-bit
PIECE_S = 30.0  # the engines' window: a piece is at most this long
# The cut is looked for in this last part before a piece's end. vLLM looks in the last second;
# in speech that second often holds no pause (a sentence across it: 16 of 42 cuts of a 20-minute
# recording, bench/longform_quality.py), so the gateway looks back five.
SEARCH_S = 5.0
QUIET_S = 0.1  # the quiet window's length (vLLM's min_energy_split_window_size, 1600 samples)
QUIET_RATIO = 1.5  # windows this close to the quietest's energy (1.8 dB) are as quiet
SILENT_RMS = 4  # and any at most this loud (16-bit: -78 dBFS) is silence, whatever the quietest


@dataclass(frozen=True)
class Piece:
    """One piece of a recording: its place in the recording's samples."""

    index: int
    start: int  # first sample
    end: int  # one past the last sample

    def offset_s(self, rate: int = RATE) -> float:
        return self.start / rate

    def duration_s(self, rate: int = RATE) -> float:
        return (self.end - self.start) / rate


def quietest(samples: Sequence[int], start: int, end: int, window: int) -> int:
    """Where to cut in [start, end): in the middle of the longest run of quiet whole `window`s (the
    last among equals), a window being quiet when its energy is at most QUIET_RATIO times the
    quietest's, or silence (SILENT_RMS). A pause's windows differ in their noise (dither, the room),
    not in kind: the quietest single window is as likely in a short gap between two words as in
    the pause between two sentences. `start` when no whole window fits."""
    count = max(0, (end - start) // window)
    if not count:
        return start
    # Sums of squares in numpy: five seconds at 16 kHz a cut, thousands of cuts a minute on a busy
    # worker, which a Python loop would spend its event loop on.
    region = np.asarray(samples[start:start + count * window], dtype=np.int64).reshape(count, window)
    energies = (region * region).sum(axis=1)
    quiet = (energies <= max(energies.min() * QUIET_RATIO, window * SILENT_RMS ** 2)).tolist()
    best_first, best_length, first = 0, 0, None
    for i, is_quiet in enumerate(quiet + [False]):
        if is_quiet:
            first = i if first is None else first
            continue
        if first is not None and i - first >= best_length:
            best_first, best_length = first, i - first
        first = None
    return start + best_first * window + best_length * window // 2


def cut(samples: Sequence[int], start: int = 0, rate: int = RATE, piece_s: float = PIECE_S,
        search_s: float = SEARCH_S, quiet_s: float = QUIET_S) -> int | None:
    """Where the piece that begins at sample `start` ends: at the quietest `quiet_s` in the last
    `search_s` before it would pass `piece_s`; None when the rest fits in one piece. It reads no
    more than `piece_s` past `start`, so a recording can be cut as it is decoded."""
    length, window = round(piece_s * rate), max(1, round(quiet_s * rate))
    if len(samples) - start <= length:
        return None
    search = min(length, round(search_s * rate))
    at = quietest(samples, start + length - search, start + length, window)
    return at if at > start else start + length


def pieces(samples: Sequence[int], rate: int = RATE, piece_s: float = PIECE_S, search_s: float = SEARCH_S,
           quiet_s: float = QUIET_S) -> list[Piece]:
    """A whole recording's `samples` (mono, at `rate`) as its pieces, one after the other."""
    bounds = [0]
    while (end := cut(samples, bounds[-1], rate, piece_s, search_s, quiet_s)) is not None:
        bounds.append(end)
    bounds.append(len(samples))
    return [Piece(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]


def pcm16(data: bytes) -> array:
    """Little-endian 16-bit samples (decode.py's chunks) as integers."""
    samples = array("h")
    samples.frombytes(data[: len(data) // 2 * 2])
    if sys.byteorder == "big":  # pragma: no cover - the file's order is little-endian
        samples.byteswap()
    return samples


def wav(samples: array, piece: Piece, rate: int = RATE) -> bytes:
    """The piece as a 16-bit mono WAV file, what every engine reads."""
    part = samples[piece.start:piece.end]
    if sys.byteorder == "big":  # pragma: no cover
        part.byteswap()
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(part.tobytes())
    return out.getvalue()
