"""Long recordings with real speech (issue 31): is a recording split across the engines
transcribed as well as the same recording sent whole?

A 5-minute and a 20-minute espeak-ng recording of varied English sentences (deterministic, one
espeak-ng call each, so the pauses between sentences are espeak's own), sent as FLAC through the
gateway to two real CPU Whisper engines (tiny.en, one core each), response_format verbose_json:
once whole (no longform worker) and once split (a longform worker, split_above_s: 30). Reported:
each transcript's word error rate against the script; at every cut (the worker's, recomputed with
control_plane.longform.cuts on the decoded audio) whether the split transcript's words around it
are the whole transcript's, a word doubled or dropped there if not; the largest difference
between the two transcripts' segment times where their segments start or end on the same words,
and how far each is from the truth (where speech starts and stops in the audio); and each run's
latency. Needs espeak-ng, sox and flac.

    .venv/bin/python -m bench.longform_quality [--minutes 5 20] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import random
import subprocess
import tempfile
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.machine import describe_machine
from control_plane.longform import cuts, decode
from engines.common.audio import audio_duration_seconds
from harness.processes import (STARTED, GatewayStack, post_form, socket_dir, start_cpu_engine, start_longform_worker,
                               wait_until)
from harness.speech import SENTENCES, _words, speak, word_error_rate

MODEL = "whisper-tiny.en"
CONTEXT = 3  # words either side of a cut that must be the whole transcript's
TARGET_WER_POINTS = 1.0  # split at most this much above whole
TARGET_TIMESTAMP_S = 0.5
MIN_BLOCK = 5  # words in a row the two transcripts share, for their segments to be matched
PAUSE_RMS = 30  # 10 ms of audio no louder than this (16-bit: -61 dBFS) is silence
PAUSE_S = 0.15  # and this much of it in a row a pause

# Simple, common words tiny.en hears well from espeak-ng, combined by a seeded generator so no
# sentence repeats (a transcript aligns to the script in one way only). No digits: Whisper writes
# numbers its own way and the error rate would measure that.
PEOPLE = ["my brother", "the teacher", "our neighbor", "the old farmer", "a young doctor", "the pilot", "her mother",
          "the driver", "my best friend", "the new manager", "a tired student", "the little girl", "his father",
          "the captain", "a kind nurse", "the baker", "our guide", "the singer", "a quiet man", "the painter"]
ACTIONS = ["carried", "painted", "cleaned", "found", "opened", "closed", "washed", "bought", "sold", "fixed", "moved",
           "wanted", "borrowed", "noticed", "dropped", "picked up", "checked", "remembered", "forgot", "showed us"]
THINGS = ["the red box", "a heavy chair", "the garden gate", "an old map", "the kitchen table", "a broken window",
          "the blue car", "a long letter", "the wooden door", "a small boat", "the front steps", "a warm coat",
          "the yellow bicycle", "a bag of apples", "the green bottle", "a pair of shoes", "the silver key",
          "a basket of bread", "the paper kite", "a glass of water"]
PLACES = ["near the river", "in the morning", "after lunch", "before the rain started", "at the station",
          "behind the house", "on the way home", "during the storm", "at the market", "in the evening",
          "by the lake", "under the bridge", "at the end of the street", "on a cold night", "in the village",
          "next to the school", "at the top of the hill", "before dinner", "in the summer", "after the meeting"]
FEELINGS = ["happy", "surprised", "worried", "tired", "hungry", "proud", "angry", "calm", "cold", "busy"]
REASONS = ["the weather was bad", "the shop was closed", "the road was long", "nobody was at home",
           "the light was green", "the music was loud", "the water was warm", "the train was late",
           "the sky was clear", "the children were asleep"]


def sentences(seed: int = 31):
    """An endless, deterministic run of varied sentences."""
    rng = random.Random(seed)
    shapes = [
        lambda: f"{rng.choice(PEOPLE).capitalize()} {rng.choice(ACTIONS)} {rng.choice(THINGS)} {rng.choice(PLACES)}.",
        lambda: f"{rng.choice(PLACES).capitalize()}, {rng.choice(PEOPLE)} felt {rng.choice(FEELINGS)} because "
                f"{rng.choice(REASONS)}.",
        lambda: f"Did {rng.choice(PEOPLE)} see {rng.choice(THINGS)} {rng.choice(PLACES)}?",
        lambda: f"We were {rng.choice(FEELINGS)}, so {rng.choice(PEOPLE)} {rng.choice(ACTIONS)} {rng.choice(THINGS)}.",
        lambda: f"{rng.choice(REASONS).capitalize()}, and {rng.choice(PEOPLE)} {rng.choice(ACTIONS)} "
                f"{rng.choice(THINGS)} {rng.choice(PLACES)}.",
        lambda: f"{rng.choice(PEOPLE).capitalize()} was {rng.choice(FEELINGS)}.",
    ]
    while True:
        yield rng.choice(shapes)()


@dataclass
class Recording:
    script: str
    wav: Path
    flac: Path
    seconds: float


def make_recording(folder: Path, minutes: float) -> Recording:
    """At least `minutes` of espeak-ng speaking whole sentences, in one call; WAV and FLAC."""
    target, generated, count = minutes * 60, sentences(), 40
    script: list[str] = []
    while True:
        script += [next(generated) for _ in range(count - len(script))]
        wav = speak(" ".join(script), folder / f"speech-{minutes:g}min.wav")
        seconds = audio_duration_seconds(wav.read_bytes())
        if seconds >= target:
            break
        count = max(count + 1, round(count * target / seconds * 1.01))
    flac = wav.with_suffix(".flac")
    subprocess.run(["flac", "-s", "-f", str(wav), "-o", str(flac)], check=True, capture_output=True)
    return Recording(" ".join(script), wav, flac, seconds)


def decoded(path: Path) -> array:
    """`path` as the worker decodes it: 16 kHz mono samples."""
    async def pcm() -> bytes:
        return b"".join([chunk async for chunk in decode.pcm(str(path))])
    return cuts.pcm16(asyncio.run(pcm()))


def speech_edges(samples: array, rate: int = cuts.RATE) -> dict[str, list[float]]:
    """Where speech starts again after a pause (onsets) and where it stops before one (offsets),
    from the audio itself: 10 ms frames no louder than PAUSE_RMS, PAUSE_S or more in a row. The
    truth a transcript's segment times are held to (espeak-ng pauses between sentences and at
    commas)."""
    frame = rate // 100
    count = len(samples) // frame
    frames = np.asarray(samples[:count * frame], dtype=np.int64).reshape(count, frame)
    silent = ((frames * frames).mean(axis=1) <= PAUSE_RMS ** 2).tolist()
    onsets, offsets, first = [], [], None
    for i, quiet in enumerate(silent + [False]):
        if quiet:
            first = i if first is None else first
            continue
        if first is not None and (i - first) * 0.01 >= PAUSE_S:
            offsets.append(round(first * 0.01, 2))
            onsets.append(round(i * 0.01, 2))
        first = None
    if silent and not silent[0]:  # speech from the first frame, or to the last
        onsets.insert(0, 0.0)
    if silent and not silent[-1]:
        offsets.append(round(count * 0.01, 2))
    return {"onsets": onsets, "offsets": offsets}


def send(url: str, recording: Recording) -> tuple[dict, float]:
    started = time.monotonic()
    answer = post_form(url + "/v1/audio/transcriptions", [
        ("model", MODEL, None), ("file", recording.flac.read_bytes(), recording.flac.name),
        ("language", "en", None), ("response_format", "verbose_json", None)], timeout=3600)
    elapsed = time.monotonic() - started
    assert answer.status == 200, answer.text[:500]
    return answer.json(), elapsed


# -- comparing the two transcripts ---------------------------------------------------------------------


def segment_words(answer: dict) -> list[tuple[str, int]]:
    """Every word of a verbose_json answer with the index of its segment."""
    return [(word, i) for i, segment in enumerate(answer["segments"]) for word in _words(segment["text"])]


def around(words: list[str], at: int, span: int = CONTEXT) -> str:
    return " ".join(words[max(0, at - span):at]) + " | " + " ".join(words[at:at + span])


def boundaries(split: dict, pieces: list[cuts.Piece]) -> list[int]:
    """For each cut, how many of the split transcript's words come before it (the segments of the
    pieces before it: a piece's segments start at or after its offset)."""
    starts = [segment["start"] for segment in split["segments"]]
    counts = [len(_words(segment["text"])) for segment in split["segments"]]
    return [sum(c for s, c in zip(starts, counts) if s < piece.offset_s()) for piece in pieces[1:]]


def errors_near(transcript: list[str], script: list[str], places: list[int]) -> list[list[str]]:
    """The transcript's mistakes against the script (difflib on words) within CONTEXT script words
    of each place (a script word index)."""
    opcodes = [op for op in difflib.SequenceMatcher(None, transcript, script, autojunk=False).get_opcodes()
               if op[0] != "equal"]
    return [[_mistake(tag, transcript[i1:i2], script[j1:j2]) for tag, i1, i2, j1, j2 in opcodes
             if j1 < place + CONTEXT and j2 > place - CONTEXT
             and not (j1 == j2 and (j1 >= place + CONTEXT or j1 <= place - CONTEXT))] for place in places]


def _short(words: list[str], most: int = 8) -> str:
    return " ".join(words) if len(words) <= most else " ".join(words[:most]) + f" ... ({len(words)} words)"


def _mistake(tag: str, heard: list[str], said: list[str]) -> str:
    """difflib's opcode (transcript to script) in words: `delete` is a word the script does not have."""
    if tag == "delete":
        return f"added {_short(heard)!r}"
    if tag == "insert":
        return f"dropped {_short(said)!r}"
    return f"heard {_short(heard)!r} for {_short(said)!r}"


def check_cuts(split: dict, whole: dict, script: str, pieces: list[cuts.Piece]) -> dict:
    """At each cut (a place in the script: where the split transcript's words before it align),
    the split transcript's mistakes within CONTEXT words, beside the whole transcript's at the same
    script words; the same at the middle between cuts, for comparison. A cut where the split
    transcript errs and the whole does not is listed, with what kind of mistake (a word added,
    dropped or changed there)."""
    split_words, whole_words = [w for w, _ in segment_words(split)], [w for w, _ in segment_words(whole)]
    script_words = _words(script)
    to_script = difflib.SequenceMatcher(None, split_words, script_words, autojunk=False)
    at_cuts = [_mapped(to_script, at) for at in boundaries(split, pieces)]
    between = [(a + b) // 2 for a, b in zip([0] + at_cuts, at_cuts + [len(script_words)])][1:]
    split_cut, whole_cut = errors_near(split_words, script_words, at_cuts), errors_near(whole_words, script_words, at_cuts)
    split_mid = errors_near(split_words, script_words, between)
    worse = []
    for piece, place, mine, theirs in zip(pieces[1:], at_cuts, split_cut, whole_cut):
        if mine and mine != theirs:
            kinds = {e.split(" ")[0] for e in mine} - {e.split(" ")[0] for e in theirs}
            worse.append({"cut_s": round(piece.offset_s(), 2), "script": around(script_words, place), "split": mine,
                          "whole": theirs, "kind": ("word(s) added" if "added" in kinds else "word(s) dropped"
                                                    if "dropped" in kinds else "word(s) misheard")})
    return {
        "cuts": len(at_cuts),
        "split_wrong_near_cut": sum(map(bool, split_cut)), "whole_wrong_near_cut": sum(map(bool, whole_cut)),
        "split_wrong_mid_piece": sum(map(bool, split_mid)),
        "split_added_or_dropped_near_cut": sum(any(e.startswith(("added", "dropped")) for e in m) for m in split_cut),
        "whole_added_or_dropped_near_cut": sum(any(e.startswith(("added", "dropped")) for e in m) for m in whole_cut),
        "split_worse_than_whole": worse,
    }


def _mapped(matcher: difflib.SequenceMatcher, at: int) -> int:
    """Where the first sequence's word index `at` falls in the second."""
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if i1 <= at < i2 or (i1 == i2 == at):
            return j1 + min(at - i1, j2 - j1) if tag in ("equal", "replace") else j1
    return len(matcher.b)


def loop_start(answer: dict, repeats: int = 3) -> float | None:
    """Where Whisper fell into repeating one segment (`repeats` times in a row), if it did."""
    texts = [segment["text"].strip() for segment in answer["segments"]]
    for i in range(len(texts) - repeats + 1):
        if len(set(texts[i:i + repeats])) == 1:
            return answer["segments"][i]["start"]
    return None


def wer_over(transcript: str, script: str, end: int) -> float:
    """The transcript's error rate on the script's first `end` words only (its words aligned to
    them, by difflib): edits whose script words lie there, over `end`."""
    heard, said = _words(transcript), _words(script)
    errors = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, heard, said, autojunk=False).get_opcodes():
        if tag != "equal" and j1 < end:
            errors += max(i2 - i1, min(j2, end) - j1)
    return errors / max(1, end)


def loop_start_word(answer: dict, script: str, looped: float) -> int:
    """The script word where the answer's loop begins: where its words before the loop align."""
    before = [w for s in answer["segments"] if s["start"] < looped for w in _words(s["text"])]
    return _mapped(difflib.SequenceMatcher(None, before, _words(script), autojunk=False), len(before))


def nearest(times: list[float], at: float) -> float:
    """How far `at` is from the nearest of the sorted `times`."""
    i = bisect_left(times, at)
    return min((abs(at - t) for t in times[max(0, i - 1):i + 1]), default=float("inf"))


def timestamp_differences(split: dict, whole: dict, edges: dict[str, list[float]] | None = None) -> dict:
    """Segments matched by text: where a split segment starts on the word a whole segment starts on
    (aligned), their start times; likewise for ends. The largest difference and where. With the
    audio's `edges` (speech_edges): how far each of the two is from the truth (a start from the
    nearest onset, an end from the nearest offset), over all matched pairs and over those that
    differ by more than the target, and which of the two is nearer there."""
    split_words, whole_words = segment_words(split), segment_words(whole)
    matcher = difflib.SequenceMatcher(None, [w for w, _ in split_words], [w for w, _ in whole_words], autojunk=False)
    pairs = {}
    for block in matcher.get_matching_blocks():
        if block.size < MIN_BLOCK:  # a short match may pair words of different sentences
            continue
        for k in range(block.size):
            pairs[block.a + k] = block.b + k
    first = lambda seq: {seg: i for i, (_, seg) in reversed(list(enumerate(seq)))}  # noqa: E731
    last = lambda seq: {seg: i for i, (_, seg) in enumerate(seq)}  # noqa: E731
    split_first, whole_first = first(split_words), first(whole_words)
    split_last, whole_last = last(split_words), last(whole_words)
    whole_first_at = {i: seg for seg, i in whole_first.items()}
    whole_last_at = {i: seg for seg, i in whole_last.items()}
    differences = []
    for seg, i in split_first.items():
        if (j := pairs.get(i)) is not None and j in whole_first_at:
            other = whole["segments"][whole_first_at[j]]
            differences.append((abs(split["segments"][seg]["start"] - other["start"]), "start", split["segments"][seg], other))
    for seg, i in split_last.items():
        if (j := pairs.get(i)) is not None and j in whole_last_at:
            other = whole["segments"][whole_last_at[j]]
            differences.append((abs(split["segments"][seg]["end"] - other["end"]), "end", split["segments"][seg], other))
    if not differences:
        return {"matched": 0}
    values = sorted(d for d, *_ in differences)
    worst = max(differences, key=lambda d: d[0])
    truth = {} if edges is None else _against_truth(differences, edges)
    return truth | {
        "matched": len(differences), "split_segments": len(split["segments"]), "whole_segments": len(whole["segments"]),
        "max_s": round(worst[0], 3), "median_s": round(values[len(values) // 2], 3),
        "over_target": sum(d > TARGET_TIMESTAMP_S for d in values),
        "worst": {"edge": worst[1], "text": worst[2]["text"].strip(),
                  "split": [worst[2]["start"], worst[2]["end"]], "whole": [worst[3]["start"], worst[3]["end"]]},
    }


def _against_truth(differences: list, edges: dict[str, list[float]]) -> dict:
    def off(edge: str, segment: dict) -> float:
        return nearest(edges["onsets"] if edge == "start" else edges["offsets"], segment[edge])

    def spread(values: list[float]) -> dict:
        values = sorted(values)
        return {"median_s": round(values[len(values) // 2], 3), "p90_s": round(values[int(0.9 * (len(values) - 1))], 3),
                "over_target": sum(v > TARGET_TIMESTAMP_S for v in values)} if values else {}

    apart = [(edge, s, w) for d, edge, s, w in differences if d > TARGET_TIMESTAMP_S]
    return {"truth": {
        "split_off_truth": spread([off(edge, s) for _, edge, s, _ in differences]),
        "whole_off_truth": spread([off(edge, w) for _, edge, _, w in differences]),
        "where_apart": {"pairs": len(apart), "split_nearer": sum(off(e, s) < off(e, w) for e, s, w in apart),
                        "whole_nearer": sum(off(e, w) < off(e, s) for e, s, w in apart),
                        "split_within_target": sum(off(e, s) <= TARGET_TIMESTAMP_S for e, s, w in apart),
                        "whole_within_target": sum(off(e, w) <= TARGET_TIMESTAMP_S for e, s, w in apart)}}}


def analyse(script: str, whole: dict, split: dict, bounds: list[tuple[int, int]],
            edges: dict[str, list[float]] | None = None) -> dict:
    """Everything reported of one recording, from its script, both answers and its pieces' samples."""
    pieces = [cuts.Piece(i, start, end) for i, (start, end) in enumerate(bounds)]
    whole_wer, split_wer = word_error_rate(script, whole["text"]), word_error_rate(script, split["text"])
    run = {
        "script_words": len(_words(script)), "pieces": len(pieces), "bounds": bounds,
        "whole": {"wer_pct": round(100 * whole_wer, 2), "words": len(_words(whole["text"])),
                  "segments": len(whole["segments"]), "duration": whole["duration"]},
        "split": {"wer_pct": round(100 * split_wer, 2), "words": len(_words(split["text"])),
                  "segments": len(split["segments"]), "duration": split["duration"]},
        "wer_split_minus_whole_points": round(100 * (split_wer - whole_wer), 2),
        "cut_times_s": [round(p.offset_s(), 2) for p in pieces[1:]],
        "at_cuts": check_cuts(split, whole, script, pieces),
        "timestamps": timestamp_differences(split, whole, edges),
    }
    if (looped := loop_start(whole)) is not None:  # the same comparison on the stretch before the whole one's loop
        end = loop_start_word(whole, script, looped)
        run["whole_loops_from_s"] = looped
        run["before_the_loop"] = {"script_words": end, "whole_wer_pct": round(100 * wer_over(whole["text"], script, end), 2),
                                  "split_wer_pct": round(100 * wer_over(split["text"], script, end), 2)}
    return run


# -- the stacks ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 20.0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results (and transcripts) here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (audio, logs)")
    parser.add_argument("--analyse", type=Path, default=None, help="only analyse again what --json wrote")
    args = parser.parse_args()
    if args.analyse:
        for run in json.loads(args.analyse.read_text())["runs"]:
            texts = run["transcripts"]
            again = analyse(texts["script"], texts["whole"], texts["split"], run["bounds"], texts.get("edges"))
            print(json.dumps({k: v for k, v in again.items() if k != "bounds"}, indent=1))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-lf-quality-"))
    results = {"machine": describe_machine(), "engines": f"2x whisper_cpu {MODEL} int8, one thread each", "runs": []}
    try:
        recordings = [make_recording(folder, minutes) for minutes in args.minutes]
        engines = [start_cpu_engine(folder, MODEL, f"cpu-{i}")[1] for i in range(2)]
        (folder / "whole").mkdir()
        whole_stack = GatewayStack(folder / "whole", MODEL, engines)
        warm = speak(SENTENCES[0], folder / "warm.wav").read_bytes()
        for url in engines:
            assert post_form(url + "/v1/audio/transcriptions", [("model", MODEL, None), ("file", warm, "w.wav")],
                             timeout=60).status == 200
        wholes = [send(whole_stack.envoy.url, r) for r in recordings]
        whole_stack.stop()

        (folder / "split").mkdir()
        sockets = socket_dir()
        worker = start_longform_worker(folder / "split", sockets)
        split_stack = GatewayStack(folder / "split", MODEL, engines, longform={
            "workers": 1, "socket_dir": sockets, "split_above_s": 30.0})
        wait_until(lambda: all(h.get("health_flags") == "healthy" for h in
                               split_stack.envoy.endpoints().get("whisper:longform", {"-": {}}).values()),
                   10, "Envoy to find the worker healthy")
        splits = [send(split_stack.envoy.url, r) for r in recordings]

        for recording, (whole, whole_s), (split, split_s) in zip(recordings, wholes, splits):
            samples = decoded(recording.flac)
            pieces, edges = cuts.pieces(samples), speech_edges(samples)
            run = analyse(recording.script, whole, split, [(p.start, p.end) for p in pieces], edges)
            run.update(recording_s=round(recording.seconds, 1), flac_mb=round(recording.flac.stat().st_size / 2**20, 1))
            run["whole"]["latency_s"], run["split"]["latency_s"] = round(whole_s, 1), round(split_s, 1)
            results["runs"].append(run)
            if args.json:
                run["transcripts"] = {"script": recording.script, "whole": whole, "split": split, "edges": edges}
            print(json.dumps({k: v for k, v in run.items() if k not in ("transcripts", "bounds")}, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        worker.stop()
        split_stack.stop()
    finally:
        for process in reversed(STARTED):
            process.stop()
        if args.keep:
            print(f"kept {folder}")
        else:
            subprocess.run(["rm", "-rf", str(folder)], check=False)


if __name__ == "__main__":
    main()
