"""Decode exactly the frames ``[start, end)`` of a video, seeking where that is safe (see fkp_core.video)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

from fkp_core.constants import IMAGE_EXTENSIONS
from fkp_core.video.errors import VideoError
from fkp_core.video.files import _check_readable, _decode_image, _ffmpeg_reason, _open
from fkp_core.video.pixels import _to_array
from fkp_core.video.stream import _frame_rate, _Grid, _is_image_container, _rotation, _video_stream


# Seek retries: how far before the target (seconds) to seek when a seek lands past it.
_SEEK_MARGINS_S = (0.0, 1.0, 4.0, 16.0, 64.0)
# Below this target time a seek saves nothing worth its risk: decode from the start.
_NO_SEEK_BELOW_S = 1.0


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    """One decoded frame: its index in the file, its time in seconds from the first frame, pixels.

    ``image`` is (H, W) uint8 for gray, (H, W, 3) BGR uint8 otherwise, a fresh writable array.
    Unpacks as ``index, timestamp_s, image``.
    """

    index: int
    timestamp_s: float
    image: np.ndarray

    def __iter__(self) -> Iterator:
        return iter((self.index, self.timestamp_s, self.image))


@dataclass
class DecodeStats:
    """Filled in by ``read_frames`` as it goes, so a caller can tell a full range from a partial one.

    A truncated file usually just ends early with no error: ``eof`` is set and ``decoded`` falls
    short of ``expected(info.frames)``. Skipped decoding errors (``on_error="skip"``) are listed in
    ``errors``; frames they destroyed leave ``gaps`` (missing indices between delivered frames).
    """

    start: int = 0
    end: int | None = None
    decoded: int = 0  # frames delivered
    first_index: int | None = None
    last_index: int | None = None  # the last good frame delivered
    gaps: int = 0  # indices within [start, last_index] with no frame
    duplicates: int = 0  # frames dropped because their index was taken (variable frame rate)
    errors: list[str] = field(default_factory=list)
    eof: bool = False  # the stream ended before ``end``
    seeks: int = 0  # seek attempts (more than one: the demuxer landed past the target)
    sequential: bool = False  # decoded from the beginning (no timestamps, start near 0, or seek fallback)
    skipped: int = 0  # frames of the range passed over as unwanted (``skip_until``), decoded or jumped over by a seek
    decoder_frames: int = 0  # frames the decoder output, delivered or not (fewer than the range's when seeks skipped some)

    def expected(self, total_frames: int) -> int:
        """How many frames the range should hold given the file's frame count."""
        stop = total_frames if self.end is None else min(self.end, total_frames)
        return max(0, stop - self.start)

    def missing(self, total_frames: int) -> int:
        """Frames expected but neither delivered nor skipped as unwanted (> 0: mark the video ``partial``)."""
        return max(0, self.expected(total_frames) - self.decoded - self.skipped)


def read_frames(
    path: str | os.PathLike,
    start: int = 0,
    end: int | None = None,
    gray: bool = False,
    *,
    upright: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
    stats: DecodeStats | None = None,
    threads: int = 0,
    sequential: bool = False,
    skip_until: Callable[[float], float] | None = None,
) -> Iterator[DecodedFrame]:
    """Yield exactly the frames with index in ``[start, end)`` (``end=None``: to the end), in order.

    Indices are those of a sequential decode of the whole file (see the module docstring for how
    that holds across seeks). ``gray`` returns luma as full-range gray (equal to FFmpeg's "gray"
    conversion, taken straight from the Y plane: no colour conversion); else BGR. ``upright``
    applies the display rotation.

    Decoding errors: ``on_error="raise"`` stops with a VideoError naming the last good frame
    (frames before it were already yielded); ``"skip"`` drops the bad data, carries on and lists
    the errors in ``stats``. A truncated file usually ends without any error: compare
    ``stats.decoded`` with ``stats.expected(probe(path).frames)``. ``threads=0`` lets FFmpeg pick
    (one per core); give the task's CPU count when many decoders share a machine.

    ``sequential=True`` numbers frames by their position in a decode from the start of the file
    (decoding order, whatever their timestamps; timestamps still give each frame's time) and so
    decodes from the start, never seeking: for ``VideoInfo.variable_rate`` video, whose timestamps
    do not sit on the nominal rate's grid.

    ``skip_until`` (sparse reading, e.g. frame sampling): given the timestamp of a delivered frame, the
    earliest time of the next frame the caller wants. Frames more than one frame period before it are
    not delivered (counted in ``stats.skipped``), and where the stream's keyframes are closer together than
    the gap, the reader seeks to the keyframe before the wanted time instead of decoding the frames in
    between, so decoding work follows the wanted frames. Every frame within a period of the wanted time
    is delivered with its usual index and timestamp, so a caller that picks frames by their timestamps
    gets exactly the frames it would pick from a full read. Grid-indexed reads only: ``sequential`` or
    timestamp-less streams deliver every frame.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad frame range [{start}, {end})")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    st = stats if stats is not None else DecodeStats()
    st.start, st.end = start, end
    p = _check_readable(path)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return _read_image(p, start, end, gray, st)
    container = _open(p)
    if _is_image_container(container):
        container.close()
        return _read_image(p, start, end, gray, st)
    return _read_video(p, container, start, end, gray, upright, on_error, st, threads, sequential, skip_until)


def _read_image(p: Path, start: int, end: int | None, gray: bool, st: DecodeStats) -> Iterator[DecodedFrame]:
    img = _decode_image(p, gray)  # decoded before the first next(): errors surface at once
    def gen() -> Iterator[DecodedFrame]:
        st.sequential = True
        if start == 0 and (end is None or end > 0):
            st.decoded, st.first_index, st.last_index = 1, 0, 0
            yield DecodedFrame(0, 0.0, img)
        st.eof = end is None or end > 1
    return gen()


def _read_video(p: Path, container: av.container.InputContainer, start: int, end: int | None, gray: bool,
                upright: bool, on_error: str, st: DecodeStats, threads: int, sequential: bool = False,
                skip_until: Callable[[float], float] | None = None) -> Iterator[DecodedFrame]:
    try:
        stream = _video_stream(p, container)
        _set_threads(stream, threads)
    except BaseException:
        container.close()
        raise

    def gen() -> Iterator[DecodedFrame]:
        with ExitStack() as open_files:
            open_files.enter_context(container)
            if end is not None and end <= start:
                return
            rate = _frame_rate(stream)
            tb = Fraction(stream.time_base) if stream.time_base else None
            errors: list[str] = []
            keys = _Keyframes()
            source = _decode(p, container, stream, on_error, errors, st, keys)
            first = next(source, None)
            if first is None:
                _keep_errors(st, errors)
                st.eof = True
                return
            rotation = _rotation(stream, first) if upright else 0
            if sequential or first.pts is None or tb is None:  # asked for, or no timestamps: count from the start
                st.sequential = True
                _keep_errors(st, errors)
                clock = (first.pts, tb) if first.pts is not None and tb is not None else None
                yield from _emit_counted(first, source, start, end, gray, rotation, rate, st, clock)
                return
            grid = _Grid(first.pts, tb, rate)
            if start / rate < _NO_SEEK_BELOW_S:
                st.sequential = True
            else:
                source.close()
                keys.restart()
                first, source, errors = _seek(p, container, stream, grid, start, on_error, st, threads, open_files, keys)
                if first is None:  # nothing decodes at or after the target: the file ends before it
                    _keep_errors(st, errors)
                    st.eof = True
                    return
            _keep_errors(st, errors)
            if skip_until is None:
                yield from _emit(first, source, grid, start, end, gray, rotation, st)
            else:
                jumper = _Jumper(p, container, stream, grid, on_error, st, threads, open_files, keys, end)
                yield from _Sparse(jumper, start, end, gray, rotation, skip_until).frames(first, source)

    return gen()


def _keep_errors(st: DecodeStats, errors: list[str]) -> None:
    """Make the decoder's error list the one in ``st`` (it keeps growing as decoding goes on)."""
    errors[:0] = st.errors
    st.errors = errors


def _set_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = max(0, int(threads))


def _where(st: DecodeStats) -> str:
    return "before the first frame of the range" if st.last_index is None else f"after frame {st.last_index}"


def _decode(p: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            on_error: str, errors: list[str], st: DecodeStats, keys: _Keyframes | None = None) -> Iterator[av.VideoFrame]:
    """Frames from the current position to the end, decoding errors raised or recorded per packet.

    Every step consumes a packet, so damaged data can cost frames but never loop forever. ``keys``
    hears of every keyframe packet demuxed.
    """
    demux = container.demux(stream)
    try:
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except av.error.FFmpegError as e:  # the demuxer cannot go on: flush what the decoder holds
                reason = f"read error {_where(st)}: {_ffmpeg_reason(e)}"
                if on_error == "raise":
                    raise VideoError(p, reason, st.last_index) from None
                errors.append(reason)
                try:
                    yield from stream.decode(None)
                except av.error.FFmpegError:
                    pass
                return
            if keys is not None and packet.is_keyframe:
                keys.saw(packet.pts)
            try:
                frames = stream.decode(packet)
            except av.error.FFmpegError as e:
                at = "" if packet.pts is None else f" (packet at {float(packet.pts * stream.time_base):.3f} s)"
                reason = f"decoding error {_where(st)}{at}: {_ffmpeg_reason(e)}"
                if on_error == "raise":
                    raise VideoError(p, reason, st.last_index) from None
                errors.append(reason)
                continue
            yield from frames
    finally:
        demux.close()


def _seek(p: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          grid: _Grid, start: int, on_error: str, st: DecodeStats, threads: int, open_files: ExitStack,
          keys: _Keyframes | None = None):
    """Position the decoder so that its first frame is at or before ``start``; see module docstring.

    Returns (first frame or None, the frames after it, errors met on the way).
    """
    overshot = False
    tried = 0
    for margin in _SEEK_MARGINS_S:
        target = grid.pts_of(start) - int(margin / grid.tb)
        if target <= grid.first_pts:
            break  # as far back as the beginning: decode from there
        st.seeks += 1
        tried += 1
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            overshot = True  # cannot seek: decode from the beginning
            break
        errors: list[str] = []
        source = _decode(p, container, stream, on_error, errors, st, keys)
        first = next(source, None)
        if first is not None and first.pts is not None and grid.index(first.pts) <= start:
            return first, source, errors
        source.close()
        overshot = overshot or first is not None
    if tried == len(_SEEK_MARGINS_S) and not overshot:
        return None, iter(()), []  # nothing anywhere near the target: the data ends before it
    # Decode from the very beginning of a fresh open (MPEG-TS, for one, does not seek back to 0).
    st.sequential = True
    fresh = open_files.enter_context(_open(p))
    fresh_stream = _video_stream(p, fresh)
    _set_threads(fresh_stream, threads)
    errors = []
    source = _decode(p, fresh, fresh_stream, on_error, errors, st, keys)
    return next(source, None), source, errors


def _emit(first: av.VideoFrame, source: Iterator[av.VideoFrame], grid: _Grid, start: int, end: int | None,
          gray: bool, rotation: int, st: DecodeStats) -> Iterator[DecodedFrame]:
    """Index frames on the grid, drop those outside the range or whose index is taken, convert."""
    last = start - 1  # the last index delivered (or start - 1)
    prev = None  # the last index seen, for frames without a timestamp
    for frame in _chain(first, source):
        st.decoder_frames += 1
        idx = grid.index(frame.pts) if frame.pts is not None else (prev + 1 if prev is not None else 0)
        prev = idx
        if idx < start:
            continue
        if end is not None and idx >= end:
            return
        if idx <= last:
            st.duplicates += 1
            continue
        st.gaps += idx - last - 1
        last = idx
        ts = grid.seconds(frame.pts) if frame.pts is not None else idx / float(grid.rate)
        _deliver(st, idx)
        yield DecodedFrame(idx, ts, _to_array(frame, gray, rotation))
    st.eof = True


def _emit_counted(first: av.VideoFrame, source: Iterator[av.VideoFrame], start: int, end: int | None,
                  gray: bool, rotation: int, rate: Fraction, st: DecodeStats,
                  clock: tuple[int, Fraction] | None = None) -> Iterator[DecodedFrame]:
    """Frames numbered by a counter; ``clock`` (first pts, time base): their time from their timestamps."""
    for idx, frame in enumerate(_chain(first, source)):
        st.decoder_frames += 1
        if idx < start:
            continue
        if end is not None and idx >= end:
            return
        _deliver(st, idx)
        if clock is not None and frame.pts is not None:
            ts = float((frame.pts - clock[0]) * clock[1])
        else:
            ts = idx / float(rate)
        yield DecodedFrame(idx, ts, _to_array(frame, gray, rotation))
    st.eof = True


def _deliver(st: DecodeStats, idx: int) -> None:
    st.decoded += 1
    if st.first_index is None:
        st.first_index = idx
    st.last_index = idx


def _chain(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


# ---- sparse reads (skip_until) ---------------------------------------------------------------------

class _Keyframes:
    """Keyframe packets as demuxed: the latest one and the longest interval seen between two in a row (pts units)."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.interval = 0

    def saw(self, pts: int | None) -> None:
        if pts is None:
            return
        if self.last is not None and pts > self.last:
            self.interval = max(self.interval, pts - self.last)
        self.last = pts

    def restart(self) -> None:
        """Before a seek: the next keyframe seen does not follow the last one in the stream."""
        self.last = None

    def expected_by(self, pts: int) -> bool:
        """Whether a keyframe should come after the latest one and at or before ``pts``."""
        return self.interval > 0 and self.last is not None and self.last + self.interval <= pts


class _Jumper:
    """Seeks a sparse read forward over unwanted frames, when a keyframe is expected before the wanted time."""

    def __init__(self, p: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream, grid: _Grid,
                 on_error: str, st: DecodeStats, threads: int, open_files: ExitStack, keys: _Keyframes, end: int | None):
        self.p, self.container, self.stream, self.grid = p, container, stream, grid
        self.on_error, self.st, self.threads, self.open_files, self.keys, self.end = on_error, st, threads, open_files, keys, end
        self.source: Iterator[av.VideoFrame] | None = None  # the decoder in use (closed by a seek)
        self.landing = False  # a seek was made and no frame past the last one has come since
        self.target = -1  # the last seek's target: one seek per target, so a seek never repeats itself
        self.enabled = True  # off once a seek landed before frames already read (irregular keyframes, seek fallback)

    def jump(self, want_s: float) -> Iterator[av.VideoFrame] | None:
        """Frames from a keyframe at or before the last frame that is surely before ``want_s``; None: not worth a seek."""
        target = math.floor(want_s * float(self.grid.rate)) - 1  # this frame lies at least half a period before want_s
        if self.end is not None:
            target = min(target, self.end - 1)
        if not self.enabled or target <= self.target or not self.keys.expected_by(self.grid.pts_of(target)):
            return None
        self.target = target
        self.source.close()
        self.keys.restart()
        first, self.source, errors = _seek(self.p, self.container, self.stream, self.grid, target, self.on_error, self.st,
                                           self.threads, self.open_files, self.keys)
        _keep_errors(self.st, errors)
        self.landing = True
        return iter(()) if first is None else _chain(first, self.source)


class _Sparse:
    """``_emit`` for a read with ``skip_until``: unwanted frames are counted, not converted, and jumped over by seeks."""

    def __init__(self, jumper: _Jumper, start: int, end: int | None, gray: bool, rotation: int,
                 skip_until: Callable[[float], float]):
        self.jumper, self.st, self.grid = jumper, jumper.st, jumper.grid
        self.start, self.end, self.gray, self.rotation, self.skip_until = start, end, gray, rotation, skip_until
        self.last = start - 1  # the last index delivered or passed over
        self.prev: int | None = None  # the last index seen (a frame without a timestamp follows it)

    def frames(self, first: av.VideoFrame, source: Iterator[av.VideoFrame]) -> Iterator[DecodedFrame]:
        self.jumper.source = source
        period = 1.0 / float(self.grid.rate)
        until = None  # frames before this time are not wanted (None: the next frame is)
        frames = _chain(first, source)
        while (frame := next(frames, None)) is not None:
            self.st.decoder_frames += 1
            idx = self._index(frame)
            if idx < self.start:
                continue
            if self.end is not None and idx >= self.end:
                return
            if not self._is_new(idx):
                continue
            ts = self.grid.seconds(frame.pts) if frame.pts is not None else idx / float(self.grid.rate)
            if until is not None and ts < until - period:
                self.st.skipped += 1
                frames = self.jumper.jump(until - period) or frames
                continue
            _deliver(self.st, idx)
            until = self.skip_until(ts)
            yield DecodedFrame(idx, ts, _to_array(frame, self.gray, self.rotation))
        self.st.eof = True

    def _index(self, frame: av.VideoFrame) -> int:
        idx = self.grid.index(frame.pts) if frame.pts is not None else (self.prev + 1 if self.prev is not None else 0)
        self.prev = idx
        return idx

    def _is_new(self, idx: int) -> bool:
        """Whether ``idx`` is past the last frame; counts the indices between: gaps, or frames a seek jumped over."""
        if idx <= self.last:  # after a seek: it landed before frames already read, seek no more; else a taken index
            if self.jumper.landing:
                self.jumper.enabled = False
            else:
                self.st.duplicates += 1
            return False
        if self.jumper.landing:
            self.st.skipped += idx - self.last - 1
            self.jumper.landing = False
        else:
            self.st.gaps += idx - self.last - 1
        self.last = idx
        return True
