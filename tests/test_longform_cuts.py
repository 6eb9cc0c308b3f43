"""Where a long recording is cut (control_plane/longform/cuts.py): in the longest pause of the
last five seconds before each 30 s (vLLM cuts at the quietest tenth of a second of the last one)."""

from __future__ import annotations

import wave
from array import array
import io

import pytest

from control_plane.longform.cuts import RATE, Piece, cut, pcm16, pieces, quietest, wav

LOUD = 8000


def speech(seconds: float, gaps: list[tuple[float, float]] = ()) -> array:
    """A square wave (every window as loud as the next) with silent gaps at (start, end) seconds."""
    samples = array("h", (LOUD if (i // 20) % 2 else -LOUD for i in range(round(seconds * RATE))))
    for start, end in gaps:
        for i in range(round(start * RATE), round(end * RATE)):
            samples[i] = 0
    return samples


@pytest.mark.parametrize("values,window,expected", [
    ([5000, 5000, 0, 0, 5000, 5000], 2, 3),  # the quiet pair's middle
    ([0, 0, 5000, 5000, 0, 0], 2, 5),  # the last of two equally quiet
    ([0, 0, 5000, 5000, 0, 0, 0, 0, 5000, 5000], 2, 6),  # a longer pause (two quiet windows in a row): its middle
    ([0, 0, 0, 0, 0, 0], 2, 3),  # all quiet (silence): the middle
    # Windows are whole and do not overlap: [9000, 1000] and [2000, 9000] are about as quiet (within
    # 1.5x), and [1000, 2000] is no window.
    ([9000, 9000, 9000, 1000, 2000, 9000], 2, 4),
    # A pause's windows differ in their noise: one quieter window in a short gap loses to the
    # longer pause, whose windows are within 1.5x of it.
    ([9000, 100, 9000, 110, 120, 110, 9000], 1, 4),
    ([9000, 100, 9000, 130, 125, 130, 9000], 1, 1),  # ... but not to louder ones (energy 1.6-1.7x)
    ([9000, 0, 9000, 3, 4, 2, 9000], 1, 4),  # dither (RMS up to 4) is silence as much as zeros
    ([5000, 5000, 5000], 4, 0),  # no whole window: the start
])
def test_quietest_window(values, window, expected):
    assert quietest(values, 0, len(values), window) == expected


@pytest.mark.parametrize("seconds,gaps,expected_cuts_s", [
    (30.0, [], []),  # one window's worth: not cut
    (45.0, [(29.3, 29.4)], [29.35]),  # a pause in the last second: cut in its middle
    (45.0, [(26.0, 26.1)], [26.05]),  # one in the last five seconds: a shorter piece, no word cut
    (45.0, [(10.0, 12.0)], [27.5]),  # no pause near the end: all as loud, the middle of the five seconds
    (45.0, [(24.0, 24.4)], [27.5]),  # a pause before the last five seconds is not searched
    (45.0, [(26.0, 26.1), (29.0, 29.3)], [29.15]),  # of two pauses, the longer, in its middle
    (85.0, [(29.5, 29.6), (59.05, 59.15)], [29.55, 59.1]),  # the next piece is counted from the cut
])
def test_cuts_at_the_pause_before_each_boundary(seconds, gaps, expected_cuts_s):
    found = pieces(speech(seconds, gaps))
    assert [round(p.start / RATE, 3) for p in found[1:]] == expected_cuts_s


def test_pieces_cover_the_recording_once_and_fit_the_window():
    samples = speech(185.0, [(t, t + 0.1) for t in (29.6, 58.2, 88.9)])
    found = pieces(samples)
    assert found[0].start == 0 and found[-1].end == len(samples)
    assert all(a.end == b.start for a, b in zip(found, found[1:]))
    assert all(0 < p.duration_s() <= 30.0 for p in found)
    assert [p.index for p in found] == list(range(len(found)))
    assert len(found) == 7


def test_a_cut_reads_no_more_than_one_piece_past_its_start():
    """What a worker decoding as it goes relies on: a cut needs only the next 30 s."""
    samples = speech(61.0, [(29.2, 29.3)])
    assert cut(samples[: 30 * RATE + 1]) == cut(samples) == round(29.25 * RATE)
    assert cut(samples[: 30 * RATE]) is None


def test_a_piece_is_a_16_khz_mono_wav_of_its_samples():
    samples = pcm16(speech(2.0).tobytes())
    data = wav(samples, Piece(0, RATE // 2, RATE))
    with wave.open(io.BytesIO(data)) as file:
        assert (file.getnchannels(), file.getsampwidth(), file.getframerate(), file.getnframes()) == (1, 2, RATE, RATE // 2)
        assert file.readframes(RATE // 2) == samples[RATE // 2:RATE].tobytes()


def test_pcm16_drops_an_odd_last_byte():
    assert list(pcm16(b"\x01\x00\xff\xff\x07")) == [1, -1]
