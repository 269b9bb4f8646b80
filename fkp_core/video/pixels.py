"""Decoded frames to numpy arrays: full-range gray straight from the luma plane, BGR, display rotation."""

from __future__ import annotations

import av
import cv2
import numpy as np


# Limited-range (16..235) luma to full range (0..255): what swscale does for "gray", 4x cheaper.
# _gray computes it arithmetically; the table is the reference it must equal (tests/test_video.py).
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)
_LUMA_FIRST_FORMATS = frozenset({
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
    "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "nv24", "gray",
})


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
