"""Probe a video or still image: frame count, exact rate, size, codec, rotation, variable frame rate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from fkp_core.constants import IMAGE_EXTENSIONS
from fkp_core.video.errors import VideoError
from fkp_core.video.files import _check_readable, _decode_image, _open
from fkp_core.video.stream import _frame_rate, _Grid, _is_image_container, _rotation, _video_stream


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
        duration = _duration(container, stream)
        frames, exact = _frame_count(p, stream, duration, rate, count_frames)
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


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """The stream's duration in seconds, else the container's, else 0 (raw streams state none)."""
    tb = stream.time_base
    if stream.duration and tb:
        return float(stream.duration * tb)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _frame_count(p: Path, stream: av.video.stream.VideoStream, duration: float, rate: Fraction,
                 count_frames: bool) -> tuple[int, bool]:
    """(frames, exact): the container's count, else packets counted, else an estimate from the duration."""
    frames, exact = int(stream.frames or 0), bool(stream.frames and stream.frames > 0)
    if not exact:
        if count_frames or not duration:  # no duration (raw streams): counting is the only way
            frames, exact = _count_packets(p), True
        else:
            frames = max(1, int(round(duration * float(rate))))
    return frames, exact


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
