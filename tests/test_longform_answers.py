"""The pieces' answers as one (control_plane/longform/answers.py): what a client of a split
recording reads is what one engine would have answered for the whole of it."""

from __future__ import annotations

import pytest

from control_plane.longform.answers import cues, from_verbose, join, join_text, language_code
from control_plane.longform.cuts import RATE, Piece

# Three pieces: 0-29.5 s, 29.5-59 s, 59-70 s.
PIECES = [Piece(0, 0, round(29.5 * RATE)), Piece(1, round(29.5 * RATE), 59 * RATE), Piece(2, 59 * RATE, 70 * RATE)]


def verbose(text: str, language: str, segments: list[tuple[float, float, str]], words=None, duration=29.5) -> dict:
    return {"duration": duration, "language": language, "text": text,
            "segments": [{"id": i, "avg_logprob": -0.1, "compression_ratio": 1.0, "end": e, "no_speech_prob": None,
                          "seek": 0, "start": s, "temperature": 0.0, "text": t, "tokens": [1]}
                         for i, (s, e, t) in enumerate(segments)],
            "words": words}


@pytest.mark.parametrize("texts,expected", [
    ([" hello", " world"], " hello world"),
    (["hello", "world"], "hello world"),  # a text without vLLM's leading space still keeps words apart
    ([" hello ", " world"], " hello  world"),  # nothing is taken out
    ([" hello", "", " world"], " hello world"),  # a silent piece adds nothing
    ([], ""),
])
def test_texts_join_in_order(texts, expected):
    assert join_text(texts) == expected


def test_json_usage_is_the_whole_recording_rounded_up_once():
    answers = [{"text": " one", "usage": {"type": "duration", "seconds": 30}},
               {"text": " two", "usage": {"type": "duration", "seconds": 30}},
               {"text": " three", "usage": {"type": "duration", "seconds": 11}}]
    assert join(answers, PIECES, "json", 70.0, RATE) == {"text": " one two three", "usage": {"type": "duration", "seconds": 70}}
    assert join(answers, PIECES, "json", 69.2, RATE)["usage"]["seconds"] == 70


def test_a_translation_answer_carries_no_usage():
    assert join([{"text": " a"}, {"text": " b"}, {"text": " c"}], PIECES, "json", 70.0, RATE) == {"text": " a b c"}


def test_verbose_json_segments_and_words_move_by_their_piece():
    answers = [
        verbose(" a b", "en", [(0.0, 2.0, " a"), (2.0, 29.0, " b")], words=[{"word": "a", "start": 0.5, "end": 1.0}]),
        verbose(" c", "en", [(0.0, 29.5, " c")], words=[]),
        verbose(" d", "de", [(1.25, 3.5, " d")], words=[{"word": "d", "start": 1.25, "end": 2.0}], duration=11.0),
    ]
    joined = join(answers, PIECES, "verbose_json", 70.0, RATE)
    assert joined["text"] == " a b c d"
    assert joined["duration"] == 70.0
    assert joined["language"] == "en"  # most of the audio
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in joined["segments"]] == [
        (0, 0.0, 2.0, " a"), (1, 2.0, 29.0, " b"), (2, 29.5, 59.0, " c"), (3, 60.25, 62.5, " d")]
    assert [s["seek"] for s in joined["segments"]] == [0, 0, 2950, 5900]
    assert joined["words"] == [{"word": "a", "start": 0.5, "end": 1.0}, {"word": "d", "start": 60.25, "end": 61.0}]


def test_verbose_json_without_words_keeps_null():
    answers = [verbose(" a", "en", []), verbose(" b", "en", []), verbose(" c", "en", [])]
    assert join(answers, PIECES, "verbose_json", 70.0, RATE)["words"] is None


def test_the_language_of_most_audio_wins_and_the_first_among_equals():
    two = [Piece(0, 0, RATE), Piece(1, RATE, 2 * RATE)]
    assert join([verbose("", "fr", []), verbose("", "en", [])], two, "verbose_json", 2.0, RATE)["language"] == "fr"
    long_second = [Piece(0, 0, RATE), Piece(1, RATE, 5 * RATE)]
    assert join([verbose("", "fr", []), verbose("", "en", [])], long_second, "verbose_json", 5.0, RATE)["language"] == "en"


SRT = ["1\n00:00:00,000 --> 00:00:02,000\n a\n\n2\n00:00:02,000 --> 00:00:29,000\n b\n",
       "1\n00:00:00,000 --> 00:00:29,500\n c\n",
       "1\n00:00:01,250 --> 00:00:03,500\n d\nsecond line\n"]


def test_srt_cues_are_retimed_and_renumbered():
    assert join(SRT, PIECES, "srt", 70.0, RATE) == (
        "1\n00:00:00,000 --> 00:00:02,000\n a\n\n"
        "2\n00:00:02,000 --> 00:00:29,000\n b\n\n"
        "3\n00:00:29,500 --> 00:00:59,000\n c\n\n"
        "4\n00:01:00,250 --> 00:01:02,500\n d\nsecond line\n")


def test_vtt_cues_are_retimed_and_keep_their_settings():
    vtt = ["WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n a\n",
           "WEBVTT\n\n00:00.000 --> 00:29.500 align:start\n c\n",
           "WEBVTT\n\n"]
    assert join(vtt, PIECES, "vtt", 70.0, RATE) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n a\n\n00:00:29.500 --> 00:00:59.000 align:start\n c\n")


def test_a_recording_over_an_hour_is_timed_in_hours():
    late = [Piece(0, 3600 * RATE, 3630 * RATE)]
    assert cues(join(["1\n00:00:01,000 --> 00:00:02,000\n x\n"], late, "srt", 3630.0, RATE)) == [(3601.0, 3602.0, "", " x")]


def test_plain_text_answers_join_as_text():
    assert join([" a", " b", " c"], PIECES, "text", 70.0, RATE) == " a b c"


@pytest.mark.parametrize("answer,code", [
    ({"language": "en", "text": " a"}, "en"),
    ({"language": "haw"}, "haw"),
    ({"language": "english"}, None),  # a name, not a code the engines take as `language`
    ({"language": "EN"}, None),
    ({"language": None}, None),
    ({"text": " a"}, None),
    (" a", None),
])
def test_the_language_a_first_piece_heard_is_passed_on_only_as_a_code(answer, code):
    assert language_code(answer) == code


VERBOSE = {"task": "transcribe", "language": "en", "duration": 29.55, "text": " a b", "segments": [], "words": None}


@pytest.mark.parametrize("response_format,expected", [
    ("json", {"text": " a b", "usage": {"type": "duration", "seconds": 30}}),
    ("text", " a b"),
    ("verbose_json", VERBOSE),
])
def test_a_first_pieces_verbose_answer_becomes_the_format_asked_for(response_format, expected):
    assert from_verbose(VERBOSE, response_format) == expected
    assert from_verbose("plain", response_format) == "plain"
