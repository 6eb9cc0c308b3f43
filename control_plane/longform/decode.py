"""A recording decoded to mono 16-bit PCM (16 kHz, or lower where the recording is) as it is read, by FFmpeg's libraries through
PyAV (every container and codec the engines read; no ffmpeg program needed, as in the image).

Decoding runs in a thread, a bounded queue between it and the event loop, so a recording holds
a few chunks of PCM however long it is, and a recording abandoned (its client gone) stops its
thread at the next chunk.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import av

from control_plane.longform.cuts import RATE

AHEAD = 8  # chunks decoded ahead of what the pieces took
CHUNK_BYTES = 1 << 16  # about 2 s of PCM


class Undecodable(Exception):
    """Not audio FFmpeg can decode (or no audio stream in it)."""


def _pcm(path: str, rate: int):
    """`path`'s first audio stream as mono s16 bytes at `rate`, frame by frame."""
    with av.open(path) as container:
        if not container.streams.audio:
            raise Undecodable("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        # Frames that are already mono s16 at the rate (a telephone or 16 kHz WAV) pass as they
        # are, until one is not: resampling costs more than decoding, per frame of a few ms.
        as_is = True
        for frame in container.decode(stream):
            as_is = as_is and frame.format.name == "s16" and frame.layout.nb_channels == 1 and frame.sample_rate == rate
            if as_is:
                yield memoryview(frame.planes[0])[:frame.samples * 2]
                continue
            for out in resampler.resample(frame):
                yield memoryview(out.planes[0])[:out.samples * 2]
        for out in resampler.resample(None):
            yield memoryview(out.planes[0])[:out.samples * 2]


def _decode(path: str, rate: int, put, stop: threading.Event) -> None:
    """`path` at `rate`, to `put` in chunks of CHUNK_BYTES (a frame is a few milliseconds: handing
    each over on its own cost more than decoding it)."""
    chunk = bytearray()
    for data in _pcm(path, rate):
        chunk += data
        if len(chunk) >= CHUNK_BYTES:
            if stop.is_set():
                return
            put(bytes(chunk))
            chunk.clear()
    if chunk:
        put(bytes(chunk))


async def pcm(path: str, rate: int = RATE) -> AsyncIterator[bytes]:
    """`path` as PCM chunks at `rate`; Undecodable when FFmpeg cannot read it."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue(AHEAD)
    stop = threading.Event()
    done = object()

    def put(item) -> None:
        asyncio.run_coroutine_threadsafe(chunks.put(item), loop).result()

    def run() -> None:
        try:
            _decode(path, rate, put, stop)
            outcome = done
        except (av.error.FFmpegError, Undecodable, ValueError, IndexError) as error:
            outcome = Undecodable(str(error))
        except BaseException as error:  # noqa: BLE001 - any other failure ends the recording too
            outcome = error
        if not stop.is_set():
            put(outcome)

    finished = loop.create_future()

    def own_thread() -> None:  # its own: a recording holds it for its whole decoding, throttled by its pieces
        try:
            run()
        finally:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    threading.Thread(target=own_thread, name="longform-decode", daemon=True).start()
    try:
        while (item := await chunks.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not chunks.empty():  # a thread blocked on a full queue takes its next chunk and sees stop
            chunks.get_nowait()
        await asyncio.shield(finished)


def _count(path: str) -> tuple[float, int]:
    """Every frame decoded, its samples counted at its own rate (no resampling: what it decodes
    to is the same length at any rate)."""
    with av.open(path) as container:
        if not container.streams.audio:
            raise Undecodable("no audio stream")
        stream = container.streams.audio[0]
        seconds = sum(frame.samples / frame.sample_rate for frame in container.decode(stream) if frame.sample_rate)
        return seconds, min(stream.sample_rate or RATE, RATE)


async def probe(path: str) -> tuple[float, int]:
    """(the seconds of audio `path` decodes to, the rate its pieces are sent at: 16 kHz, or the
    recording's own where it is lower: a telephone call's 8 kHz pieces are half the size, and
    the engines resample anyway). A first pass: what the recording is metered and bounded by
    before any piece goes out. Undecodable when FFmpeg cannot read it."""
    try:
        return await asyncio.to_thread(_count, path)
    except (av.error.FFmpegError, ValueError, IndexError) as error:
        raise Undecodable(str(error)) from None
