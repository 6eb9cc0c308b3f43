"""The pieces' answers made one, as one engine would have answered the whole recording.

Each piece was answered in the response format the client asked for; here they are joined in
the recording's order: texts one after the other; verbose_json's segments and words moved by
their piece's offset and numbered again, `duration` the whole recording's, `language` the one most
of the audio was in; SRT and WebVTT cues re-timed and renumbered; vLLM's `usage` for the whole
duration (rounded up to a second, as vLLM does), so the recording is metered once.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from control_plane.longform.cuts import Piece

# A cue's timing line: SRT writes 00:00:01,500 and WebVTT 00:00:01.500 (hours optional in WebVTT).
_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(.*)$")


def join_text(texts: Sequence[str]) -> str:
    """The pieces' texts one after the other. vLLM's start with a space; where one does not and
    the text before it does not end in one, a space keeps the words apart."""
    joined = ""
    for text in texts:
        if joined and text and not joined[-1].isspace() and not text[0].isspace():
            joined += " "
        joined += text
    return joined


def _moved(value, offset: float):
    return round(value + offset, 3) if isinstance(value, (int, float)) else value


def _language(answers: Sequence[dict], pieces: Sequence[Piece]):
    """The language most of the recording's audio was heard in (the first piece's among equals)."""
    heard: Counter = Counter()
    for answer, piece in zip(answers, pieces):
        if answer.get("language"):
            heard[answer["language"]] += piece.end - piece.start
    if not heard:
        return answers[0].get("language") if answers else None
    most = max(heard.values())
    return next(a["language"] for a in answers if a.get("language") and heard[a["language"]] == most)


def join_json(answers: Sequence[dict], pieces: Sequence[Piece], duration_s: float, rate: int) -> dict:
    """json and verbose_json answers (and vLLM's `text`, which answers JSON) made one."""
    joined = dict(answers[0])
    joined["text"] = join_text([a.get("text") or "" for a in answers])
    if "usage" in joined:
        joined["usage"] = {"type": "duration", "seconds": math.ceil(duration_s)}
    if "duration" in joined:
        joined["duration"] = round(duration_s, 6)
    if "language" in joined:
        joined["language"] = _language(answers, pieces)
    if "segments" in joined:
        segments = []
        for answer, piece in zip(answers, pieces):
            offset = piece.offset_s(rate)
            for segment in answer.get("segments") or []:
                moved = dict(segment, id=len(segments), start=_moved(segment.get("start"), offset),
                             end=_moved(segment.get("end"), offset))
                if isinstance(segment.get("seek"), int):  # Whisper's seek counts 10 ms frames
                    moved["seek"] = segment["seek"] + round(offset * 100)
                segments.append(moved)
        joined["segments"] = segments
    if "words" in joined:
        words = [dict(w, start=_moved(w.get("start"), piece.offset_s(rate)), end=_moved(w.get("end"), piece.offset_s(rate)))
                 for answer, piece in zip(answers, pieces) for w in answer.get("words") or []]
        joined["words"] = words if any(a.get("words") is not None for a in answers) else None
    return joined


def _seconds(hours: str | None, minutes: str, secs: str, millis: str) -> float:
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000


def _stamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def cues(document: str) -> list[tuple[float, float, str, str]]:
    """An SRT or WebVTT document's cues: (start, end, settings after the timing, text)."""
    found = []
    for block in re.split(r"\r?\n\s*\r?\n", document.strip()):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            timing = _TIMING.match(line)
            if timing:
                parts = timing.groups()
                found.append((_seconds(*parts[0:4]), _seconds(*parts[4:8]), parts[8], "\n".join(lines[i + 1:])))
                break
    return found


def join_subtitles(documents: Sequence[str], pieces: Sequence[Piece], response_format: str, rate: int) -> str:
    """SRT or WebVTT documents, one a piece, as one: every cue moved by its piece's offset and
    numbered again from 1 (SRT)."""
    moved = [(start + piece.offset_s(rate), end + piece.offset_s(rate), settings, text)
             for document, piece in zip(documents, pieces) for start, end, settings, text in cues(document)]
    if response_format == "vtt":
        body = "\n".join(f"{_stamp(s, '.')} --> {_stamp(e, '.')}{settings}\n{text}\n" for s, e, settings, text in moved)
        return "WEBVTT\n\n" + body
    return "\n".join(f"{i}\n{_stamp(s, ',')} --> {_stamp(e, ',')}{settings}\n{text}\n"
                     for i, (s, e, settings, text) in enumerate(moved, start=1))


# What the engines accept as `language`: ISO 639-1 codes, as vLLM's verbose_json names them.
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


def language_code(answer) -> str | None:
    """The language a verbose_json answer says its audio was in, where it is a code the engines
    take as `language` (an engine that names it `english` tells the others nothing)."""
    language = answer.get("language") if isinstance(answer, dict) else None
    return language if isinstance(language, str) and _LANGUAGE_CODE.fullmatch(language) else None


def from_verbose(answer, response_format: str):
    """A verbose_json answer as the engine would have answered `response_format` (json or text;
    anything else, or an answer that is not an object, as it is)."""
    if not isinstance(answer, dict):
        return answer
    if response_format == "json":
        return {"text": answer.get("text") or "",
                "usage": {"type": "duration", "seconds": math.ceil(answer.get("duration") or 0)}}
    if response_format == "text":
        return answer.get("text") or ""
    return answer


def join(answers: Sequence, pieces: Sequence[Piece], response_format: str, duration_s: float, rate: int):
    """The pieces' answers (each a parsed JSON object, or the text of a text answer) as one, in
    the same kind: an object for JSON answers, text otherwise (where some pieces' are text)."""
    if answers and all(isinstance(a, dict) for a in answers):
        return join_json(answers, pieces, duration_s, rate)
    if response_format in ("srt", "vtt"):
        return join_subtitles(answers, pieces, response_format, rate)
    return join_text([a if isinstance(a, str) else a.get("text") or "" for a in answers])
