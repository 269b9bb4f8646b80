"""Encode frames to a video file that appears only when complete (H.264 where available, exact frame rate)."""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np


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
