"""Containers that lie: each honest clip of the corpus with its header patched to claim about
`claim_s` seconds, the rest of the file (every sample) left as it was, as a client trying to pay
for less audio than it sends would make them. Engines decode the samples, not the claim.

Patched: WAV's byte rate (x the lie), FLAC's STREAMINFO sample count, MP3's Xing/Info frame
count, Ogg's granule positions (every page, CRCs made good again), MP4's `mvhd` and every
`mdhd` duration, WebM's Segment Info Duration.
"""

from __future__ import annotations

import struct
from pathlib import Path

# The clips (by the corpus's names, harness/audio_corpus.py) whose header can claim a duration.
LYING_KINDS = ("wav", "flac", "mp3-cbr", "mp3-vbr", "opus", "vorbis", "m4a-faststart", "m4a-moov-at-end", "webm")


def _wav(data: bytearray, factor: float) -> None:
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if kind == b"fmt ":
            byte_rate = struct.unpack_from("<I", data, offset + 16)[0]
            struct.pack_into("<I", data, offset + 16, int(byte_rate * factor))
            return
        offset += 8 + size + size % 2
    raise ValueError("no fmt chunk")


def _flac(data: bytearray, factor: float) -> None:
    field = struct.unpack_from(">Q", data, 18)[0]  # rate 20, channels 3, bits 5, samples 36
    samples = field & ((1 << 36) - 1)
    struct.pack_into(">Q", data, 18, (field & ~((1 << 36) - 1)) | max(1, int(samples / factor)))


def _mp3(data: bytearray, factor: float) -> None:
    for tag in (b"Xing", b"Info"):
        at = data.find(tag, 0, 4096)
        if at >= 0:
            frames = struct.unpack_from(">I", data, at + 8)[0]
            struct.pack_into(">I", data, at + 8, max(1, int(frames / factor)))
            return
    raise ValueError("no Xing/Info frame count")


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg(data: bytearray, factor: float) -> None:
    offset, preskip = 0, 0
    head = data.find(b"OpusHead")
    if head >= 0:
        preskip = struct.unpack_from("<H", data, head + 10)[0]
    while offset + 27 <= len(data) and data[offset:offset + 4] == b"OggS":
        segments = data[offset + 26]
        length = 27 + segments + sum(data[offset + 27:offset + 27 + segments])
        granule = struct.unpack_from("<q", data, offset + 6)[0]
        if granule > 0:
            struct.pack_into("<q", data, offset + 6, preskip + int((granule - preskip) / factor))
            struct.pack_into("<I", data, offset + 22, 0)
            struct.pack_into("<I", data, offset + 22, _ogg_crc(bytes(data[offset:offset + length])))
        offset += length


def _boxes(data: bytearray, start: int, end: int):
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, offset + 8)[0], 16
        elif size == 0:
            size = end - offset
        yield kind, offset, header, size
        offset += size


def _mp4(data: bytearray, factor: float) -> None:
    def patch(at: int) -> None:  # a mvhd/mdhd body: version, flags, then times, timescale, duration
        if data[at] == 1:
            duration = struct.unpack_from(">Q", data, at + 24)[0]
            struct.pack_into(">Q", data, at + 24, max(1, int(duration / factor)))
        else:
            duration = struct.unpack_from(">I", data, at + 16)[0]
            struct.pack_into(">I", data, at + 16, max(1, int(duration / factor)))

    def walk(start: int, end: int) -> None:
        for kind, offset, header, size in _boxes(data, start, end):
            if kind in (b"mvhd", b"mdhd"):
                patch(offset + header)
            elif kind in (b"moov", b"trak", b"mdia"):
                walk(offset + header, offset + size)

    walk(0, len(data))


def _webm(data: bytearray, factor: float) -> None:
    at = data.find(b"\x44\x89")
    if at < 0:
        raise ValueError("no Duration")
    size = data[at + 2] & 0x7F
    if size == 8:
        struct.pack_into(">d", data, at + 3, struct.unpack_from(">d", data, at + 3)[0] / factor)
    else:
        struct.pack_into(">f", data, at + 3, struct.unpack_from(">f", data, at + 3)[0] / factor)


PATCHERS = {"wav": _wav, "flac": _flac, "mp3-cbr": _mp3, "mp3-vbr": _mp3, "opus": _ogg, "vorbis": _ogg,
            "m4a-faststart": _mp4, "m4a-moov-at-end": _mp4, "webm": _webm}


def lying(path: Path, kind: str, true_s: float, claim_s: float = 1.0) -> bytes:
    """The clip's bytes with its header claiming about `claim_s` of its `true_s` seconds."""
    data = bytearray(path.read_bytes())
    PATCHERS[kind](data, true_s / claim_s)
    return bytes(data)
