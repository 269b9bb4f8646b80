"""What probing and decoding agree on about a video stream: which stream, its frame-rate grid, its rotation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from fkp_core.video.errors import VideoError


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
