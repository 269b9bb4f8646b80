"""Video in and out: probe a file, decode an exact frame range, encode an mp4, list inputs.

The annotate job splits each video into frame segments ``[start, end)`` decoded by parallel
tasks, so two promises matter more than speed:

* **A frame's index depends only on the frame.** It is computed from its presentation timestamp,
  ``round((pts - first_pts) * time_base * rate)`` with ``first_pts`` the timestamp of the first
  frame a decode from the start of the file outputs and ``rate`` the stream's frame rate. Two
  tasks that start decoding at different keyframes therefore give the same frame the same index,
  every frame of the file falls in exactly one segment, and a frame lost to corrupt data does not
  shift the frames after it (a frame *counter* would). For constant-frame-rate video, which is
  what cameras and encoders write, this equals the position in a sequential decode (tested on
  H.264 with B-frames, open GOPs, MPEG-4 Part 2 in AVI, Matroska, MPEG-TS and NTSC rates).
* **Seeking is checked, never trusted.** ``read_frames`` seeks (backward, keyframes only) to the
  timestamp of ``start``, decodes forward and drops frames before ``start``. Some demuxers land
  *after* the target (AVI and MPEG-TS index by decode time, open-GOP leading pictures cannot be
  decoded after a seek), so the first decoded frame is checked: if it is past ``start`` the seek
  is retried further back (1, 4, 16, 64 s) and finally the file is decoded from its beginning.

Streams without timestamps (raw ``.h264``) are decoded from the beginning with a counter. Variable
frame rate video is mapped onto the nominal rate's grid: a frame whose index is already taken is
dropped and an index no frame maps to is skipped; both are counted in ``DecodeStats`` (for
phone-style jitter, under half a frame, rounding absorbs it and nothing is dropped). ``probe`` says when
that happens (``VideoInfo.variable_rate``: timestamps off the grid, a screen recording), and
``read_frames(sequential=True)`` then numbers every frame in decoding order instead (one decode from the
start: no seeking, so no parallel segments for such video).

Frames are returned as stored: ``VideoInfo.rotation`` reports the display rotation (phones store
portrait video as landscape plus a rotation) and ``read_frames(upright=True)`` applies it, for
detectors that need upright faces; keypoints are then in display coordinates.

Still images (``IMAGE_EXTENSIONS``, or a file FFmpeg recognises as an image) are 1-frame videos.

Inputs are local paths or pyarrow filesystem URIs (``s3://bucket/clips/a.mp4``, ``gs://...``,
``hdfs://...``, ``file:///...``): a URI is read through ``pyarrow.fs`` (random access, so seeking
works as on a local file), which lets cluster workers read the videos from an object store.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from fkp_core.constants import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
)
MEDIA_EXTENSIONS: tuple[str, ...] = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS

# Seek retries: how far before the target (seconds) to seek when a seek lands past it.
_SEEK_MARGINS_S = (0.0, 1.0, 4.0, 16.0, 64.0)
# Below this target time a seek saves nothing worth its risk: decode from the start.
_NO_SEEK_BELOW_S = 1.0
# Limited-range (16..235) luma to full range (0..255): what swscale does for "gray", 4x cheaper.
# _gray computes it arithmetically; the table is the reference it must equal (tests/test_video.py).
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)
_LUMA_FIRST_FORMATS = frozenset({
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
    "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "nv24", "gray",
})


class VideoError(RuntimeError):
    """A video that cannot be read (or read fully); the message names the file and the reason.

    ``last_good_index`` is the index of the last frame delivered before a decoding error (None
    when none was, or when the error is not a decoding error).
    """

    def __init__(self, path: str | os.PathLike, reason: str, last_good_index: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.last_good_index = last_good_index
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the fields across pickling (Ray ships exceptions between processes)
        return (type(self), (self.path, self.reason, self.last_good_index))


@dataclass(frozen=True)
class VideoInfo:
    """What a segment planner needs to know about a video (or a still image: 1 frame, fps 0).

    ``frames`` is the container's frame count when it has one (``frames_exact``), else
    ``round(duration_s * fps)`` (Matroska, WebM, MPEG-TS, raw streams): an estimate that can be
    off by a frame or two. ``read_frames`` never relies on it (a range past the real end simply
    yields fewer frames), so plan the last segment with ``end=None`` and compare the count read
    with ``frames`` to spot truncation. ``width``/``height`` are the stored size; ``rotation`` is
    the counter-clockwise display rotation in degrees (0, 90, 180, 270; see ``upright``).
    """

    path: str
    frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    codec: str
    rotation: int = 0
    frames_exact: bool = True
    is_image: bool = False
    rate: Fraction | None = None  # the exact frame rate (e.g. 30000/1001); None for images
    pix_fmt: str = ""
    container: str = ""
    # frame timestamps off the nominal rate's grid (screen recordings): index such video with
    # read_frames(sequential=True), which numbers frames in decoding order (one segment, no seeking)
    variable_rate: bool = False

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) after rotation, i.e. as frames read with ``upright=True`` are."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


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

    def expected(self, total_frames: int) -> int:
        """How many frames the range should hold given the file's frame count."""
        stop = total_frames if self.end is None else min(self.end, total_frames)
        return max(0, stop - self.start)

    def missing(self, total_frames: int) -> int:
        """Frames expected but not delivered (> 0: mark the video ``partial``)."""
        return max(0, self.expected(total_frames) - self.decoded)


# ---- files named by URI ----------------------------------------------------------------------------

def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` names, which are read through pyarrow's filesystems."""
    return isinstance(path, str) and "://" in path


@dataclass(frozen=True)
class RemoteFile:
    """A file named by a pyarrow filesystem URI: the few ``Path`` attributes this module uses."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.uri).path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @cached_property
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path inside it), made once per file (an object store's client is not free)."""
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise VideoError(self.uri, f"cannot open this URI ({exc})") from None

    def open(self) -> pa.NativeFile:
        fs, inner = self.filesystem
        try:
            return fs.open_input_file(inner)
        except PermissionError:
            raise VideoError(self.uri, "permission denied (file not readable)") from None
        except (pa.ArrowException, OSError) as exc:
            raise VideoError(self.uri, f"cannot read file: {exc}") from None


def _check_remote(r: RemoteFile) -> RemoteFile:
    """One metadata request; an unreadable file fails when it is opened (``RemoteFile.open``)."""
    fs, inner = r.filesystem
    try:
        info = fs.get_file_info(inner)
    except (pa.ArrowException, OSError) as exc:
        raise VideoError(r.uri, f"cannot read file: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise VideoError(r.uri, "file not found")
    if info.type == pafs.FileType.Directory:
        raise VideoError(r.uri, "is a directory, not a video")
    if info.size == 0:
        raise VideoError(r.uri, "empty file (0 bytes)")
    return r


# ---- checks shared by probe and read_frames ------------------------------------------------------

def _check_readable(path: str | os.PathLike) -> Path | RemoteFile:
    """Turn the usual file-system failures into a VideoError with a plain reason."""
    if is_uri(path):
        return _check_remote(RemoteFile(str(path)))
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise VideoError(p, "symbolic link loop (the link leads back to itself)") from None
            raise VideoError(p, f"broken symbolic link (its target {os.readlink(p)} does not exist)")
        raise VideoError(p, "file not found")
    if p.is_dir():
        raise VideoError(p, "is a directory, not a video")
    try:
        with open(p, "rb") as f:
            head = f.read(1)
    except PermissionError:
        raise VideoError(p, "permission denied (file not readable)") from None
    except OSError as e:
        raise VideoError(p, f"cannot read file: {e.strerror or e}") from None
    if not head:
        raise VideoError(p, "empty file (0 bytes)")
    return p


def _open(p: Path | RemoteFile) -> av.container.InputContainer:
    try:
        # the container keeps the pyarrow file (closed when the container is released)
        return av.open(p.open() if isinstance(p, RemoteFile) else str(p), "r")
    except av.error.FFmpegError as e:
        raise VideoError(p, f"not a video or image FFmpeg can read ({_ffmpeg_reason(e)})") from None


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return re.sub(r"^\[Errno -?\d+\]\s*", "", str(msg))


def _video_stream(p: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(p, f"no video stream (streams: {', '.join(kinds)})")
    stream = streams[0]
    if not stream.codec_context or stream.codec_context.width <= 0 or stream.codec_context.height <= 0:
        raise VideoError(p, "video stream has no decodable picture size")
    return stream


def _is_image_container(container: av.container.InputContainer) -> bool:
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The rate of the index grid: the average rate, or the base rate when they agree within 0.5 %.

    The base rate (r_frame_rate) is usually the exact nominal fraction (30000/1001) where the
    average (frames / duration) can come out slightly off, which would drift over hours.
    """
    avg, base = stream.average_rate, stream.base_rate or stream.guessed_rate
    if avg and base and abs(float(base) / float(avg) - 1.0) < 0.005:
        return Fraction(base)
    for rate in (avg, base, stream.guessed_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return Fraction(25)  # FFmpeg's own default for streams that state none


def _rotation(stream: av.video.stream.VideoStream, frame: av.VideoFrame | None) -> int:
    """Counter-clockwise display rotation: the frame's display matrix, else a legacy 'rotate' tag."""
    degrees = 0.0
    if frame is not None and frame.rotation:
        degrees = float(frame.rotation)
    elif "rotate" in stream.metadata:  # clockwise by convention
        try:
            degrees = -float(stream.metadata["rotate"])
        except ValueError:
            degrees = 0.0
    return int(round(degrees / 90.0)) * 90 % 360


# ---- probe ---------------------------------------------------------------------------------------

def probe(path: str | os.PathLike, count_frames: bool = False) -> VideoInfo:
    """Frame count, rate, size, codec and rotation of a video or still image; VideoError if unusable.

    Opens the container and decodes the first frame (proof that the file is a video we can decode,
    and the source of the display rotation). ``count_frames=True`` counts the packets when the
    container states no frame count (reads the whole file, decodes nothing) so ``frames`` is exact;
    it is done anyway for streams with no duration either (raw ``.h264``).
    """
    p = _check_readable(path)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(p)
    with _open(p) as container:
        if _is_image_container(container):
            streams = container.streams.video
            return _probe_image(p, streams[0].codec_context.name if streams else None)
        stream = _video_stream(p, container)
        rate = _frame_rate(stream)
        first = _first_frame(p, container, stream)
        if first is None:
            raise VideoError(p, "no decodable video frame")
        tb = stream.time_base
        if stream.duration and tb:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        frames, exact = int(stream.frames or 0), bool(stream.frames and stream.frames > 0)
        if not exact:
            if count_frames or not duration:  # no duration (raw streams): counting is the only way
                frames, exact = _count_packets(p), True
            else:
                frames = max(1, int(round(duration * float(rate))))
        if not duration and frames:
            duration = frames / float(rate)
        cc = stream.codec_context
        variable, counted = _off_grid(p, rate)
        if variable and counted:
            frames, exact = counted, True
        return VideoInfo(
            path=str(p), frames=frames, fps=float(rate), width=first.width, height=first.height,
            duration_s=duration, codec=cc.name, rotation=_rotation(stream, first),
            frames_exact=exact, rate=rate, pix_fmt=first.format.name, container=container.format.name,
            variable_rate=variable,
        )


# packets whose timestamps _off_grid reads (demuxing only): ~14 minutes at 60 fps
VFR_SCAN_PACKETS = 50_000


def _off_grid(p: Path, rate: Fraction) -> tuple[bool, int]:
    """(whether frame timestamps leave the nominal rate's grid, packets seen) over the first VFR_SCAN_PACKETS.

    Off the grid, two frames can round to one index and an index can have no frame; ``read_frames``
    would then drop the one and skip the other, so such video is numbered by decoding order instead.
    Jitter under half a frame (phones) rounds away and keeps the video on the grid.
    """
    try:
        with _open(p) as container:
            stream = _video_stream(p, container)
            tb = Fraction(stream.time_base) if stream.time_base else None
            pts = []
            for pkt in container.demux(stream):
                if pkt.size and not pkt.is_discard:
                    pts.append(pkt.pts)
                    if len(pts) >= VFR_SCAN_PACKETS:
                        break
    except (av.error.FFmpegError, VideoError, OSError):
        return False, 0
    if tb is None or not pts or any(t is None for t in pts):
        return False, len(pts)
    pts.sort()
    grid = _Grid(pts[0], tb, rate)
    return any(grid.index(t) != i for i, t in enumerate(pts)), len(pts)


def _count_packets(p: Path) -> int:
    """Video packets in the file (one per frame), by demuxing a fresh open: no decoding."""
    with _open(p) as container:
        stream = _video_stream(p, container)
        return sum(1 for pkt in container.demux(stream) if pkt.size and not pkt.is_discard)


def _probe_image(p: Path, codec: str | None = None) -> VideoInfo:
    """A still image as a 1-frame video: fps 0 and duration 0 (there is no time axis)."""
    img = _decode_image(p, gray=False)
    return VideoInfo(
        path=str(p), frames=1, fps=0.0, width=int(img.shape[1]), height=int(img.shape[0]),
        duration_s=0.0, codec=codec or p.suffix.lower().lstrip(".") or "image", rotation=0,
        frames_exact=True, is_image=True, rate=None, pix_fmt="bgr24", container="image",
    )


def _decode_image(p: Path, gray: bool) -> np.ndarray:
    """cv2.imdecode (which applies EXIF orientation, so the pixels are upright)."""
    if isinstance(p, RemoteFile):
        with p.open() as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    else:
        data = np.fromfile(p, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise VideoError(p, "not an image OpenCV can decode")
    return img


def _first_frame(p: Path, container: av.container.InputContainer,
                 stream: av.video.stream.VideoStream) -> av.VideoFrame | None:
    """The first frame a decode from the start outputs (None if none decodes)."""
    errors = 0
    for packet in container.demux(stream):
        try:
            frames = stream.decode(packet)
        except av.error.FFmpegError:
            errors += 1
            if errors > 50:
                raise VideoError(p, "video data cannot be decoded (repeated decoding errors at the start)") from None
            continue
        if frames:
            return frames[0]
    return None


# ---- read_frames ---------------------------------------------------------------------------------

class _Grid:
    """Timestamp -> frame index on the nominal rate grid, in exact integer arithmetic."""

    def __init__(self, first_pts: int, time_base: Fraction, rate: Fraction):
        self.first_pts = first_pts
        self.tb = time_base
        self.num = time_base.numerator * rate.numerator
        self.den = time_base.denominator * rate.denominator
        self.rate = rate

    def index(self, pts: int) -> int:
        return (2 * (pts - self.first_pts) * self.num + self.den) // (2 * self.den)  # round half up

    def seconds(self, pts: int) -> float:
        return float((pts - self.first_pts) * self.tb)

    def pts_of(self, index: int) -> int:
        """The timestamp of frame ``index`` (floored), in stream time base units."""
        return self.first_pts + (index * self.den) // self.num


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
    return _read_video(p, container, start, end, gray, upright, on_error, st, threads, sequential)


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
                upright: bool, on_error: str, st: DecodeStats, threads: int, sequential: bool = False) -> Iterator[DecodedFrame]:
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
            source = _decode(p, container, stream, on_error, errors, st)
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
                first, source, errors = _seek(p, container, stream, grid, start, on_error, st, threads, open_files)
                if first is None:  # nothing decodes at or after the target: the file ends before it
                    _keep_errors(st, errors)
                    st.eof = True
                    return
            _keep_errors(st, errors)
            yield from _emit(first, source, grid, start, end, gray, rotation, st)

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
            on_error: str, errors: list[str], st: DecodeStats) -> Iterator[av.VideoFrame]:
    """Frames from the current position to the end, decoding errors raised or recorded per packet.

    Every step consumes a packet, so damaged data can cost frames but never loop forever.
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
          grid: _Grid, start: int, on_error: str, st: DecodeStats, threads: int, open_files: ExitStack):
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
        source = _decode(p, container, stream, on_error, errors, st)
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
    source = _decode(p, fresh, fresh_stream, on_error, errors, st)
    return next(source, None), source, errors


def _emit(first: av.VideoFrame, source: Iterator[av.VideoFrame], grid: _Grid, start: int, end: int | None,
          gray: bool, rotation: int, st: DecodeStats) -> Iterator[DecodedFrame]:
    """Index frames on the grid, drop those outside the range or whose index is taken, convert."""
    last = start - 1  # the last index delivered (or start - 1)
    prev = None  # the last index seen, for frames without a timestamp
    for frame in _chain(first, source):
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


def _to_array(frame: av.VideoFrame, gray: bool, rotation: int) -> np.ndarray:
    img = _gray(frame) if gray else frame.to_ndarray(format="bgr24")
    return apply_rotation(img, rotation) if rotation else img


def _gray(frame: av.VideoFrame) -> np.ndarray:
    """Full-range luma: the Y plane as is (full-range video) or through a 16..235 -> 0..255 table."""
    fmt = frame.format.name
    if fmt not in _LUMA_FIRST_FORMATS:
        return frame.to_ndarray(format="gray")
    plane = frame.planes[0]
    y = np.frombuffer(plane, np.uint8, count=plane.line_size * frame.height)
    y = y.reshape(frame.height, plane.line_size)[:, : frame.width]
    if fmt == "gray" or fmt.startswith("yuvj") or frame.color_range == 2:
        return y.copy()
    return _limited_to_full(y)


def _limited_to_full(y: np.ndarray) -> np.ndarray:
    """(y - 16) * 255 / 219, rounded and saturated: equal to the table _LIMITED_TO_FULL (no value lands
    on .5), in two vectorised passes that take ~0.6x the time of cv2.LUT on a 640 x 480 frame."""
    return cv2.convertScaleAbs(cv2.subtract(y, 16), alpha=255.0 / 219.0)


def apply_rotation(image: np.ndarray, rotation: float) -> np.ndarray:
    """Rotate a stored frame counter-clockwise by ``rotation`` degrees (multiples of 90) for display."""
    k = int(round(rotation / 90.0)) % 4
    if k == 0:
        return image
    code = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}[k]
    return cv2.rotate(image, code)


# ---- VideoWriter ---------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def h264_available() -> bool:
    """Whether this PyAV build can open the libx264 encoder (some builds ship without it)."""
    try:
        cc = av.codec.CodecContext.create("libx264", "w")
        cc.width, cc.height, cc.pix_fmt = 64, 64, "yuv420p"
        cc.time_base = Fraction(1, 25)
        cc.open()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def _as_rate(fps: float | Fraction) -> Fraction:
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}


class VideoWriter:
    """Encode BGR (or gray) frames one at a time to a video file that appears only when complete.

    H.264 (libx264, yuv420p, ``crf``, ``preset``) when this PyAV build has it, MPEG-4 Part 2 (mp4v)
    otherwise. The frame rate is kept exactly (pass ``Fraction(30000, 1001)`` for NTSC; a float is
    turned into the nearest fraction with denominator <= 1001). yuv420p needs even sizes: an odd
    width or height is padded by one column/row repeating the edge (``size`` is the padded size),
    so pixel coordinates are unchanged. Frames go to a hidden temporary file in the same folder,
    renamed over ``path`` on a clean close; an exception in the ``with`` block removes it, and so
    does closing with no frames written (a ValueError: an empty video is no video).
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, width: int, height: int, *,
                 codec: str | None = None, crf: int = 23, preset: str = "veryfast",
                 rotation: int = 0, threads: int = 0):
        if width <= 0 or height <= 0:
            raise ValueError(f"bad frame size {width}x{height}")
        self.path = Path(path)
        self.rate = _as_rate(fps)
        self.width, self.height = int(width), int(height)
        self.size = (self.width + self.width % 2, self.height + self.height % 2)
        self.codec = codec or ("libx264" if h264_available() else "mpeg4")
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp_path = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.tmp{self.path.suffix}")
        fmt = _FORMATS.get(self.path.suffix.lower(), "mp4")
        self._container = av.open(str(self.temp_path), "w", format=fmt)
        try:
            if self.codec == "libx264":
                options = {"crf": str(crf), "preset": preset}
            else:
                options = {}
            stream = self._container.add_stream(self.codec, rate=self.rate, options=options)
            stream.width, stream.height = self.size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = max(0, int(threads))
            if self.codec != "libx264":  # rate control for mpeg4: ~0.25 bit per pixel
                pixels_per_s = self.size[0] * self.size[1] * float(self.rate)
                stream.codec_context.bit_rate = max(200_000, int(pixels_per_s * 0.25))
            if rotation:
                stream.set_display_rotation(rotation)
            self._stream = stream
        except BaseException:
            self._discard()
            raise
        self._closed = False

    def write(self, image: np.ndarray) -> None:
        """Encode one frame: (H, W, 3) BGR or (H, W) gray uint8 of the size given at construction."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        if image.dtype != np.uint8 or image.shape[:2] != (self.height, self.width) or image.ndim not in (2, 3) \
                or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected a {self.height}x{self.width} uint8 gray or BGR frame, "
                             f"got {image.shape} {image.dtype}")
        if self.size != (self.width, self.height):
            image = cv2.copyMakeBorder(image, 0, self.size[1] - self.height, 0, self.size[0] - self.width,
                                       cv2.BORDER_REPLICATE)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24" if image.ndim == 3 else "gray")
        frame.pts = self.frames_written
        frame.time_base = 1 / self.rate
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it into place; returns the final path."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self._discard()
            raise ValueError(f"{self.path}: no frames were written, no video saved")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            os.replace(self.temp_path, self.path)
        except BaseException:
            self._discard()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (no file appears)."""
        if not self._closed:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---- inputs --------------------------------------------------------------------------------------

def _is_media(p: Path) -> bool:
    return p.suffix.lower() in MEDIA_EXTENSIONS and not p.name.startswith(".")


def _walk(root: Path, notes: list[str] | None = None) -> Iterable[Path]:
    """Media files under ``root``, skipping hidden files and folders (temporary outputs, ._ files).

    A link with a media name that leads nowhere (broken, or a loop) is yielded too, so that it is reported
    as a failed input rather than missed in silence; a folder with a media name is searched, and noted.
    """
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs:
            if notes is not None and _is_media(Path(name)):
                notes.append(f"{Path(folder) / name} is a folder, not a video: searched it for videos")
        for name in files:
            p = Path(folder) / name
            if _is_media(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
                yield p


def find_media(inputs: Iterable[str | os.PathLike], notes: list[str] | None = None) -> list[Path | str]:
    """The media files named by ``inputs`` (files, folders, glob patterns, URIs): unique, sorted.

    Local files come back as resolved ``Path``s, files named by URI as URI strings. A name typed
    by the user is taken as is, whatever its extension (the job records it as failed if it is not
    a video); a file *found* in a folder or by a glob must have a video or image extension (any
    case) and not be hidden. A missing plain input raises FileNotFoundError (an unusable URI:
    ValueError); a folder or pattern matching nothing contributes nothing (the caller decides).
    ``notes`` (a list) receives what a user should hear about, such as a folder named like a video.
    """
    found: set[Path | str] = set()
    for item in inputs:
        text = os.fspath(item)
        if is_uri(text):
            found.update(_find_remote(text))
            continue
        if glob.has_magic(text) and not Path(text).expanduser().exists():  # "clip [1].mp4" is a name
            for match in glob.glob(os.path.expanduser(text), recursive=True):
                m = Path(match)
                if m.is_dir():
                    found.update(_resolved(q) for q in _walk(m, notes))
                elif _is_media(m) and m.is_file():
                    found.add(m.resolve())
            continue
        p = Path(text).expanduser()
        if p.is_dir():
            if notes is not None and _is_media(p):
                notes.append(f"{text} is a folder, not a video: searched it for videos")
            found.update(_resolved(q) for q in _walk(p, notes))
        elif p.exists() or p.is_symlink():  # a broken link or a loop: a failed input with its reason
            found.add(_resolved(p))
        else:
            raise FileNotFoundError(f"input not found: {text}")
    return sorted(found, key=str)


def _resolved(p: Path) -> Path:
    """The absolute path with links followed; a link that leads nowhere stays as the link itself."""
    return p.resolve() if p.exists() else Path(os.path.abspath(p))


def _find_remote(uri: str) -> list[str]:
    """``find_media`` for one URI: a file, a folder (recursive) or a glob pattern in its path."""
    parts = urlsplit(uri)
    pattern = glob.has_magic(parts.path)
    if pattern:  # list the folder before the first wildcard, match the pattern against what is there
        head = parts.path[: re.search(r"[*?[]", parts.path).start()].rsplit("/", 1)[0]
        parts_dir = parts._replace(path=head or "/")
    else:
        parts_dir = parts
    try:
        fs, root = pafs.FileSystem.from_uri(parts_dir.geturl())
        info = fs.get_file_info(root)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{uri}: cannot open this input location ({exc})") from None

    if info.type == pafs.FileType.File and not pattern:
        return [uri]
    if info.type != pafs.FileType.Directory:
        if pattern:
            return []
        raise FileNotFoundError(f"input not found: {uri}")
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = []
    for f in listing:
        rel = f.path[len(root.rstrip("/")):].lstrip("/")
        if f.type != pafs.FileType.File or any(part.startswith(".") for part in rel.split("/")):
            continue
        child = parts_dir._replace(path=f"{parts_dir.path.rstrip('/')}/{rel}").geturl()  # same scheme, host, query
        if pattern and not fnmatch.fnmatchcase(urlsplit(child).path, parts.path):
            continue
        if PurePosixPath(rel).suffix.lower() in MEDIA_EXTENSIONS:
            found.append(child)
    return found


def video_id(path: str | os.PathLike) -> str:
    """A stable, file-name-safe id: the sanitised stem + '-' + 8 hex of sha1(resolved absolute path).

    The stem keeps ids readable; the hash keeps two ``clip.mp4`` in different folders apart. A
    URI is hashed as written.
    """
    p = RemoteFile(path) if is_uri(path) else _resolved(Path(path).expanduser())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem).strip("._-")[:64] or "video"
    return f"{stem}-{hashlib.sha1(str(p).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
