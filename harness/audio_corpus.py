"""Real speech in every container clients upload, made at test time with Debian's encoders.

espeak-ng speaks a sentence; sox makes it 16 kHz mono and repeats it to the lengths wanted;
flac, lame, opusenc and ffmpeg encode it. A clip's true duration is the source WAV's sample
count over its rate, so every format is checked against the same number.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engines.common.audio import audio_duration_seconds
from harness.speech import speak

SENTENCE = ("The gateway counts the work of speech in audio seconds. A voice command is one engine request, "
            "a meeting recording is many.")
TOOLS = ("espeak-ng", "sox", "flac", "lame", "opusenc", "ffmpeg")


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    seconds: float  # the true duration
    exact: bool  # the gateway reads it from the container, or it estimates


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=300)


def _seconds(wav: Path) -> float:
    return audio_duration_seconds(wav.read_bytes())


def speech_wav(folder: Path, seconds: float) -> Path:
    """Speech repeated (and cut) to `seconds`, 16 kHz mono 16-bit."""
    base = folder / "speech-base.wav"
    if not base.exists():
        speak(SENTENCE, base)
    out = folder / f"speech-{seconds:g}s.wav"
    if not out.exists():
        repeats = max(0, int(seconds // _seconds(base)))
        _run("sox", "-R", base, out, "repeat", str(repeats), "trim", "0", f"{seconds}")
    return out


def make_corpus(folder: Path, lengths: tuple[float, ...] = (1.0, 7.5, 61.0),
                only: tuple[str, ...] | None = None) -> list[Clip]:
    """Every format (or those named in `only`) at each length, with the variants the gateway must
    handle (see each name)."""
    clips = []
    for length in lengths:
        wav = speech_wav(folder, length)
        true = _seconds(wav)
        stem = folder / f"{length:g}s"
        encodings = [
            ("wav", wav, [], True),
            ("wav-24bit-stereo-extensible", Path(f"{stem}-ext.wav"), ["sox", "-R", wav, "-b", "24", "-c", "2", "{out}"], True),
            ("wav-streaming-header", Path(f"{stem}-stream.wav"), ["ffmpeg", "-i", wav, "-f", "wav", "-y", "pipe:"], True),
            ("flac", Path(f"{stem}.flac"), ["flac", "-s", "-f", wav, "-o", "{out}"], True),
            ("mp3-cbr", Path(f"{stem}-cbr.mp3"), ["lame", "-S", "--preset", "cbr", "64", wav, "{out}"], True),
            ("mp3-vbr", Path(f"{stem}-vbr.mp3"), ["lame", "-S", "-V", "5", wav, "{out}"], True),
            ("mp3-no-header", Path(f"{stem}-plain.mp3"), ["lame", "-S", "-t", "--cbr", "-b", "64", wav, "{out}"], False),
            ("opus", Path(f"{stem}.opus"), ["opusenc", "--quiet", "--comp", "0", wav, "{out}"], True),
            ("vorbis", Path(f"{stem}.ogg"), ["ffmpeg", "-i", wav, "-c:a", "libvorbis", "-y", "{out}"], True),
            ("m4a-faststart", Path(f"{stem}-fast.m4a"), ["ffmpeg", "-i", wav, "-c:a", "aac", "-movflags", "+faststart",
                                                         "-y", "{out}"], True),
            ("m4a-moov-at-end", Path(f"{stem}-end.m4a"), ["ffmpeg", "-i", wav, "-c:a", "aac", "-y", "{out}"], True),
            ("webm", Path(f"{stem}.webm"), ["ffmpeg", "-i", wav, "-c:a", "libopus", "-y", "{out}"], True),
            ("webm-no-duration", Path(f"{stem}-live.webm"), ["ffmpeg", "-i", wav, "-c:a", "libopus", "-f", "webm",
                                                             "-y", "pipe:"], False),
        ]
        for name, out, command, exact in encodings:
            if only is not None and name not in only:
                continue
            if command and not out.exists():
                if command[-1] == "pipe:":  # written to a pipe: the muxer cannot seek back to fill in sizes
                    with open(out, "wb") as sink:
                        subprocess.run(["ffmpeg", "-loglevel", "error", *map(str, command[1:])], stdout=sink,
                                       check=True, timeout=300)
                else:
                    tool = ["ffmpeg", "-loglevel", "error"] if command[0] == "ffmpeg" else [command[0]]
                    _run(*tool, *[out if c == "{out}" else c for c in command[1:]])
            clips.append(Clip(f"{length:g}s-{name}", out, true, exact))
    return clips
