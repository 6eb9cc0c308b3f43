"""Real speech for tests: espeak-ng speaks, sox makes it 16 kHz mono WAV; WER to score transcripts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# Sentences tiny.en transcribes well from espeak-ng's `en` voice at 150 words a minute.
SENTENCES = [
    "She opened the window and listened to the birds singing outside.",
    "We need more time to test the new version of the software.",
    "Thank you for calling, please leave a message after the tone.",
    "The children played in the park until it was dark.",
    "The library is closed on Sundays and public holidays.",
    "Can you tell me how to get to the nearest hospital?",
]


def speak(text: str, path: Path) -> Path:
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    # -R: sox's dither seeded the same each time, so the same text makes the same bytes (a corpus
    # whose estimates move between runs makes a test that passes by chance).
    subprocess.run(["sox", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True, capture_output=True)
    raw.unlink()
    return path


def join_clips(clips: list[Path], path: Path, gap_s: float = 0.5) -> Path:
    """One clip of several, with silence between them."""
    silence = path.with_suffix(".gap.wav")
    subprocess.run(["sox", "-R", "-n", "-r", "16000", "-c", "1", "-b", "16", str(silence), "trim", "0", str(gap_s)],
                   check=True, capture_output=True)
    parts = []
    for clip in clips:
        parts += [str(clip), str(silence)]
    subprocess.run(["sox", "-R", *parts, str(path)], check=True, capture_output=True)
    silence.unlink()
    return path


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, case and punctuation ignored."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        previous, row[0] = row[:], i
        for j, hyp_word in enumerate(hyp, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
    return row[len(hyp)] / max(1, len(ref))
