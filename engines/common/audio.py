"""Audio length: the simulated engine needs only how long a clip is, and tells it as vLLM does,
from the samples rather than from what the container claims (a header can lie: harness/lying_audio.py)."""

from __future__ import annotations

import io
import struct

try:  # PyAV (with the `cpu` extra): decodes every container vLLM reads
    import av
except ImportError:  # pragma: no cover - without it, compressed clips are timed by their size
    av = None

from engines.common.errors import INVALID_AUDIO, EngineError

# Compressed formats we cannot time without a decoder are assumed to run at this bit rate.
ASSUMED_COMPRESSED_BITS_PER_SECOND = 128_000
_COMPRESSED_MAGIC = (b"ID3", b"OggS", b"fLaC", b"\x1aE\xdf\xa3")


def _wav_duration(data: bytes) -> float:
    if len(data) < 12 or data[8:12] != b"WAVE":
        raise EngineError(400, INVALID_AUDIO)
    offset, byte_rate, data_bytes = 12, 0, None
    while offset + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk_id == b"fmt " and size >= 16:  # the decoder's rate: for sample formats not the byte-rate field
            tag, channels, rate, byte_rate, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == 0xFFFE and size >= 26:
                tag = struct.unpack_from("<H", data, body + 24)[0]
            if tag in (1, 3, 6, 7):  # PCM, float, A-law, mu-law: a frame is channels x bytes per sample
                byte_rate = rate * channels * -(-bits // 8)
        elif chunk_id == b"data":
            data_bytes = min(size, len(data) - body)
            break
        offset = body + size + (size & 1)
    if not byte_rate or data_bytes is None:
        raise EngineError(400, INVALID_AUDIO)
    return data_bytes / byte_rate


def _decoded_duration(data: bytes) -> float | None:
    """The samples a decoder gets out of the clip over their rate; None without PyAV or when it
    cannot decode it."""
    if av is None:
        return None
    try:
        with av.open(io.BytesIO(data)) as container:
            samples, rate = 0, None
            for frame in container.decode(container.streams.audio[0]):
                samples, rate = samples + frame.samples, frame.sample_rate
        return samples / rate if rate else None
    except (av.error.FFmpegError, IndexError, ValueError):
        return None


def audio_duration_seconds(data: bytes) -> float:
    """Exact for WAV; decoded (PyAV) or else estimated from size for common compressed
    containers; 400 for anything else."""
    if data[:4] == b"RIFF":
        return _wav_duration(data)
    is_mp3_frame = len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0
    is_mp4 = data[4:8] == b"ftyp"
    if data.startswith(_COMPRESSED_MAGIC) or is_mp3_frame or is_mp4:
        decoded = _decoded_duration(data)
        return decoded if decoded is not None else len(data) * 8 / ASSUMED_COMPRESSED_BITS_PER_SECOND
    raise EngineError(400, INVALID_AUDIO)


def silent_wav(seconds: float, sample_rate: int = 16_000) -> bytes:
    """A mono 16-bit PCM WAV of silence: a valid clip for examples and tests."""
    frames = int(seconds * sample_rate)
    payload = b"\x00\x00" * frames
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(payload), b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16,
        b"data", len(payload),
    )
    return header + payload
