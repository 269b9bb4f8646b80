"""Keypoint-driven overlays for images and rendered videos: sunglasses, moustache, blur, pixelate, ...

Every filter has the signature ``filter(frame, boxes, keypoints) -> frame``: a BGR uint8 frame
(H, W, 3), the faces' boxes (N, 4) x, y, w, h and keypoints (N, 68, 2) in frame pixels. It returns
a new array of the same shape and dtype (the input is never written to) and is a no-op for N = 0.
Filters compose: :func:`parse_filters` turns ``"blur,keypoints"`` into validated names and
:func:`apply_filters` applies them in order. :data:`FILTERS` is the registry the CLI lists;
:func:`register_filter` lets other modules add theirs (the head-pose ``axis`` filter belongs in
``fkp_core.pose`` and registers there), without this module importing them.

These run on every frame of long videos, so the work per face is local: the artwork is drawn
once per size bucket (a cached, premultiplied BGRA sprite in a canonical face frame), warped
with one similarity transform per face only into the rectangle it covers inside the frame, and
blended there in integer arithmetic; anonymisation works on the face's rectangle only. Faces
partly or wholly outside the frame are clipped, never wrapped, and faces with non-finite
keypoints (a tracker's gaps) are skipped.

The artwork is the project's own, drawn with OpenCV primitives; no image files are read.
Canonical face frame ("face units"): the origin at the anchor named per sprite, x towards the
subject's left (the image's right in a frontal photo), y down, one unit = the distance between
the two eye centres.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from fkp_core.constants import (
    LEFT_EYE,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    NUM_KEYPOINTS,
    RIGHT_EYE,
    SUBNASALE,
)

Filter = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(frame BGR uint8 (H, W, 3), boxes (N, 4), keypoints (N, 68, 2)) -> new frame``."""

# ---------------------------------------------------------------------------------------------
# Tunables (named so that a reader can find and change them)
# ---------------------------------------------------------------------------------------------

# Faces whose eye distance is below this many pixels are too small to dress (and numerically
# degenerate); keypoints farther than MAX_COORD pixels from the origin are treated as garbage.
MIN_FACE_UNIT_PX = 2.0
MAX_COORD = 1e6

# Sprites are drawn for eye distances on a geometric grid (this many steps per octave, so the
# residual scale the warp applies is within +-9 %, where bilinear resampling still looks sharp),
# between these bounds in pixels. SUPERSAMPLE is the antialiasing factor of the drawing; the
# supersampled canvas is kept below SUPERSAMPLE_MAX_PX on its long side.
SPRITE_STEPS_PER_OCTAVE = 4
SPRITE_MIN_UNIT = 8
SPRITE_MAX_UNIT = 512
SUPERSAMPLE = 4
SUPERSAMPLE_MAX_PX = 1024
SPRITE_CACHE_SIZE = 64

# Sunglasses, in face units (origin: midpoint of the eye centres).
GLASSES_EXTENT = ((-1.18, 1.18), (-0.50, 0.42))  # sprite canvas (x range, y range)
LENS_CENTER = (0.50, 0.05)  # right/left lens centres at (-x, y) and (+x, y)
LENS_HALF_SIZE = (0.385, 0.275)
LENS_SQUARENESS = 3.2  # superellipse exponent: 2 is an ellipse, larger is a rounded rectangle
LENS_NOSE_CUT = 0.22  # how much the lens's lower nose-side corner is cut away
LENS_TOP_LIFT = 0.05  # the outer top corner rises (a wayfarer-ish brow line)
LENS_TOP_BGR = (46, 30, 22)  # dark smoky blue at the top ...
LENS_BOTTOM_BGR = (98, 74, 52)  # ... graded lighter to the bottom
LENS_OPACITY = 0.9
HIGHLIGHT_BGR = (255, 255, 255)
HIGHLIGHT_OPACITY = 0.42
FRAME_BGR = (22, 20, 24)
FRAME_SHINE_BGR = (92, 88, 96)
RIM_THICKNESS = 0.055
BROW_BAR_THICKNESS = 0.095
BRIDGE_THICKNESS = 0.06
TEMPLE_THICKNESS = 0.07

# Moustache, in face units (origin: MOUSTACHE_DROP of the way from the nose bottom to the
# mid-point of the mouth corners).
MOUSTACHE_EXTENT = ((-0.72, 0.72), (-0.32, 0.26))
MOUSTACHE_DROP = 0.5
MOUSTACHE_HALF_WIDTH = 0.62
MOUSTACHE_THICKNESS = 0.17  # at the middle; tapers to MOUSTACHE_TIP at the tips
MOUSTACHE_TIP = 0.014
MOUSTACHE_CURL = 0.17  # how far the tips curl up
MOUSTACHE_BGR = (28, 42, 66)  # dark brown
MOUSTACHE_DARK_BGR = (14, 20, 32)
MOUSTACHE_LIGHT_BGR = (60, 84, 118)
MOUSTACHE_OPACITY = 0.96
MOUSTACHE_STROKES = 140
MOUTH_WIDTH_IN_EYE_UNITS = 0.85  # typical mouth-corner distance / eye-centre distance

# Anonymisation: the keypoints' convex hull grown by ANONYMIZE_MARGIN (fraction of its radius
# about its centroid), with an edge feathered by a Gaussian of ANONYMIZE_FEATHER face sizes
# (face size = square root of the hull area, which does not change as the head rolls).
ANONYMIZE_MARGIN = 0.15
ANONYMIZE_FEATHER = 0.03
BLUR_SIGMA = 0.08  # in face sizes
BLUR_WORK_PX = 32  # the face is blurred at about this many pixels across, then scaled back
PIXELATE_BLOCKS = 10  # blocks across the face
MASK_WORK_PX = 64  # the feathered mask is drawn at about this many pixels per face

BOX_BGR = (0, 215, 255)
BOX_THICKNESS = 1 / 80  # of the box side, at least 1 px
DEFAULT_KEYPOINT_BGR = (80, 220, 80)

_FIXED_SHIFT = 4  # OpenCV drawing with 1/16-pixel coordinates
_ONE = 1 << _FIXED_SHIFT
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"filters need a BGR uint8 frame of shape (H, W, 3), got {got}")


def _as_keypoints(keypoints: np.ndarray | None) -> np.ndarray:
    if keypoints is None:
        return np.zeros((0, NUM_KEYPOINTS, 2), np.float64)
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size == 0:
        return np.zeros((0, NUM_KEYPOINTS, 2), np.float64)
    if kp.shape[-2:] != (NUM_KEYPOINTS, 2):
        raise ValueError(f"keypoints must be (N, {NUM_KEYPOINTS}, 2), got {kp.shape}")
    return kp.reshape(-1, NUM_KEYPOINTS, 2)


def _as_boxes(boxes: np.ndarray | None) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4), np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4), np.float64)
    if b.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) x, y, w, h, got {b.shape}")
    return b.reshape(-1, 4)


def _valid_faces(keypoints: np.ndarray | None) -> list[np.ndarray]:
    """The faces worth drawing: finite keypoints within MAX_COORD (a tracker's NaN gaps are skipped)."""
    kps = _as_keypoints(keypoints)
    ok = np.isfinite(kps).all(axis=(1, 2)) & (np.abs(kps) < MAX_COORD).all(axis=(1, 2))
    return [kp for kp, good in zip(kps, ok) if good]


# ---------------------------------------------------------------------------------------------
# Sprites: drawn once per size, premultiplied BGRA
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sprite:
    """Artwork in a canonical face frame: premultiplied BGRA uint8 and where the face-unit origin lies."""

    bgra: np.ndarray  # (h, w, 4) uint8, colour premultiplied by alpha (read-only, shared)
    anchor: tuple[float, float]  # pixel coordinates (x, y) of the face-unit origin
    unit: float  # pixels per face unit (eye-centre distance)


class _Canvas:
    """A supersampled premultiplied float canvas addressed in face units; layers go 'over' it."""

    def __init__(self, unit: int, extent: tuple[tuple[float, float], tuple[float, float]]):
        (x0, x1), (y0, y1) = extent
        self.unit, self.x0, self.y0 = unit, x0, y0
        self.w, self.h = math.ceil((x1 - x0) * unit), math.ceil((y1 - y0) * unit)
        self.ss = max(1, min(SUPERSAMPLE, SUPERSAMPLE_MAX_PX // max(self.w, self.h)))
        shape = (self.h * self.ss, self.w * self.ss)
        self.color = np.zeros((*shape, 3), np.float32)
        self.alpha = np.zeros(shape, np.float32)

    @property
    def scale(self) -> float:
        """Canvas pixels per face unit."""
        return self.unit * self.ss

    def fixed(self, pts: np.ndarray) -> np.ndarray:
        """Face units -> canvas pixel coordinates in OpenCV fixed point (int32, for shift=_FIXED_SHIFT)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        px = (pts - (self.x0, self.y0)) * self.scale + (self.ss - 1) / 2
        return np.round(px * _ONE).astype(np.int32)

    def _mask(self) -> np.ndarray:
        return np.zeros(self.alpha.shape, np.uint8)

    def polygon(self, pts: np.ndarray) -> np.ndarray:
        m = self._mask()
        cv2.fillPoly(m, [self.fixed(pts)], 255, cv2.LINE_AA, _FIXED_SHIFT)
        return m.astype(np.float32) / 255

    def polyline(self, pts: np.ndarray, thickness: float, closed: bool = False) -> np.ndarray:
        m = self._mask()
        t = max(1, round(thickness * self.scale))
        cv2.polylines(m, [self.fixed(pts)], closed, 255, t, cv2.LINE_AA, _FIXED_SHIFT)
        return m.astype(np.float32) / 255

    def ellipse(self, center: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
        m = self._mask()
        c = tuple(int(v) for v in self.fixed(np.asarray(center))[0])
        ax = (max(1, round(axes[0] * self.scale * _ONE)), max(1, round(axes[1] * self.scale * _ONE)))
        cv2.ellipse(m, c, ax, angle, 0, 360, 255, -1, cv2.LINE_AA, _FIXED_SHIFT)
        return m.astype(np.float32) / 255

    def vertical_gradient(self, y_top: float, y_bottom: float, top_bgr: tuple, bottom_bgr: tuple) -> np.ndarray:
        """(h, 1, 3) colours graded from ``top_bgr`` at face-unit y_top to ``bottom_bgr`` at y_bottom."""
        ys = (np.arange(self.alpha.shape[0]) - (self.ss - 1) / 2) / self.scale + self.y0
        t = np.clip((ys - y_top) / (y_bottom - y_top), 0, 1)[:, None, None]
        return (np.asarray(top_bgr, np.float32) * (1 - t) + np.asarray(bottom_bgr, np.float32) * t).astype(np.float32)

    def over(self, mask: np.ndarray, color: tuple | np.ndarray, opacity: float = 1.0) -> None:
        """Composite a layer of ``color`` with coverage ``mask * opacity`` over the canvas."""
        a = mask * np.float32(opacity)
        self.color *= (1 - a)[..., None]
        self.color += np.asarray(color, np.float32) * a[..., None]
        self.alpha *= 1 - a
        self.alpha += a

    def sprite(self) -> Sprite:
        """Downsample (area averaging: the antialiasing) and pack as premultiplied BGRA uint8."""
        size = (self.w, self.h)
        color = cv2.resize(self.color, size, interpolation=cv2.INTER_AREA) if self.ss > 1 else self.color
        alpha = cv2.resize(self.alpha, size, interpolation=cv2.INTER_AREA) if self.ss > 1 else self.alpha
        a8 = np.clip(np.round(alpha * 255), 0, 255).astype(np.uint8)
        c8 = np.clip(np.round(color), 0, 255).astype(np.uint8)
        c8 = np.minimum(c8, a8[..., None])  # premultiplied colour never exceeds alpha (no overflow when blending)
        bgra = np.ascontiguousarray(np.dstack([c8, a8]))
        bgra.flags.writeable = False
        return Sprite(bgra, (-self.x0 * self.unit, -self.y0 * self.unit), float(self.unit))


def _lens_outline(side: int, n: int = 96) -> np.ndarray:
    """One lens (side -1: subject's right, image left; +1: subject's left) in face units."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e = 2 / LENS_SQUARENESS
    cu, cv = np.sign(np.cos(t)) * np.abs(np.cos(t)) ** e, np.sign(np.sin(t)) * np.abs(np.sin(t)) ** e
    # u: outward (towards the temple), v: down.
    u = cu * np.where((cv > 0) & (cu < 0), 1 - LENS_NOSE_CUT * cv, 1.0)
    v = cv - LENS_TOP_LIFT / LENS_HALF_SIZE[1] * np.clip(cu, 0, None) * np.clip(-cv, 0, None)
    x = side * (LENS_CENTER[0] + u * LENS_HALF_SIZE[0])
    y = LENS_CENTER[1] + v * LENS_HALF_SIZE[1]
    return np.stack([x, y], axis=1)


def _draw_sunglasses(unit: int) -> Sprite:
    c = _Canvas(unit, GLASSES_EXTENT)
    top = LENS_CENTER[1] - LENS_HALF_SIZE[1]
    bottom = LENS_CENTER[1] + LENS_HALF_SIZE[1]
    tint = c.vertical_gradient(top, bottom, LENS_TOP_BGR, LENS_BOTTOM_BGR)
    for side in (-1, 1):
        outline = _lens_outline(side)
        lens = c.polygon(outline)
        c.over(lens, tint, LENS_OPACITY)
        # A diagonal streak and a small glint in the upper outer part of the lens, kept inside it.
        # One light source (upper image-left) for both lenses, so the streaks are parallel.
        cx, cy = side * LENS_CENTER[0] - 0.04, LENS_CENTER[1] - 0.1
        streak = c.ellipse((cx, cy), (0.2, 0.035), -28)
        glint = c.ellipse((cx + 0.19, cy - 0.08), (0.035, 0.025), 0)
        low = c.ellipse((cx + 0.12, LENS_CENTER[1] + 0.14), (0.13, 0.018), -28)
        c.over(np.minimum(np.maximum(streak, glint), lens), HIGHLIGHT_BGR, HIGHLIGHT_OPACITY)
        c.over(np.minimum(low, lens), HIGHLIGHT_BGR, HIGHLIGHT_OPACITY * 0.4)
        # Rim, a heavier brow bar along the top, and a short temple arm.
        c.over(c.polyline(outline, RIM_THICKNESS, closed=True), FRAME_BGR)
        upper = outline[outline[:, 1] < LENS_CENTER[1] - 0.35 * LENS_HALF_SIZE[1]]
        upper = upper[np.argsort(upper[:, 0])]
        c.over(c.polyline(upper, BROW_BAR_THICKNESS), FRAME_BGR)
        shine = upper + (0, -0.02)
        c.over(c.polyline(shine[len(shine) // 5 : -len(shine) // 5], RIM_THICKNESS * 0.25), FRAME_SHINE_BGR, 0.7)
        outer_x = side * (LENS_CENTER[0] + LENS_HALF_SIZE[0])
        arm = np.array([[outer_x - side * 0.02, top + 0.06], [side * 1.12, top + 0.09]])
        c.over(c.polyline(arm, TEMPLE_THICKNESS), FRAME_BGR)
    # Bridge: an arch between the lenses' inner tops.
    inner = LENS_CENTER[0] - LENS_HALF_SIZE[0]
    xs = np.linspace(-inner - 0.04, inner + 0.04, 24)
    ys = top + 0.07 - 0.05 * np.cos(np.pi * xs / (2 * (inner + 0.04)))
    c.over(c.polyline(np.stack([xs, ys], 1), BRIDGE_THICKNESS), FRAME_BGR)
    return c.sprite()


def _moustache_outline(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(outline polygon, centre line of the right half) in face units; a handlebar with curled tips."""
    u = np.linspace(0, 1, n)
    center = 0.07 * u - MOUSTACHE_CURL * (np.clip(u - 0.68, 0, None) / 0.32) ** 2
    thick = (MOUSTACHE_THICKNESS - MOUSTACHE_TIP) * (1 - u) ** 0.75 + MOUSTACHE_TIP
    notch = 0.03 * np.exp(-((u / 0.07) ** 2))  # the philtrum dip in the upper edge
    upper = center - 0.45 * thick + notch
    lower = center + 0.55 * thick
    x = u * MOUSTACHE_HALF_WIDTH
    right_upper = np.stack([x, upper], 1)
    right_lower = np.stack([x, lower], 1)
    left_upper = right_upper[::-1] * (-1, 1)
    left_lower = right_lower[::-1] * (-1, 1)
    outline = np.concatenate([left_upper, right_upper[1:], right_lower[::-1], left_lower[::-1][1:]])
    return outline, np.stack([x, center], 1)


def _draw_moustache(unit: int) -> Sprite:
    c = _Canvas(unit, MOUSTACHE_EXTENT)
    outline, _ = _moustache_outline()
    body = c.polygon(outline)
    soft = cv2.GaussianBlur(body, (0, 0), max(0.5, 0.008 * c.scale))
    shade = c.vertical_gradient(-0.12, 0.14, MOUSTACHE_DARK_BGR, MOUSTACHE_BGR)
    c.over(soft, shade, MOUSTACHE_OPACITY)
    # Hair strokes: short lines fanning out from the middle and down, clipped to the body.
    rng = np.random.default_rng(20240611)  # fixed: the same artwork in every process
    strokes = np.zeros(body.shape, np.float32)
    dark = np.zeros(body.shape, np.float32)
    for _ in range(MOUSTACHE_STROKES):
        side = rng.choice((-1.0, 1.0))
        u = rng.uniform(0.0, 0.95)
        x = side * u * MOUSTACHE_HALF_WIDTH
        y = 0.07 * u - MOUSTACHE_CURL * (max(u - 0.68, 0) / 0.32) ** 2 + rng.uniform(-0.07, 0.06) * (1 - u)
        length = rng.uniform(0.05, 0.11) * (1.1 - u)
        angle = math.radians(rng.uniform(55, 80)) if u < 0.7 else math.radians(rng.uniform(-30, 10))
        d = np.array([side * math.cos(angle), math.sin(angle)]) * length
        target = dark if rng.random() < 0.5 else strokes
        seg = np.array([[x, y] - d / 2, [x, y] + d / 2])
        cv2.polylines(target, [c.fixed(seg)], False, 1.0, max(1, round(0.008 * c.scale)), cv2.LINE_AA, _FIXED_SHIFT)
    c.over(np.minimum(strokes, body), MOUSTACHE_LIGHT_BGR, 0.55)
    c.over(np.minimum(dark, body), MOUSTACHE_DARK_BGR, 0.6)
    return c.sprite()


_PAINTERS: dict[str, Callable[[int], Sprite]] = {"sunglasses": _draw_sunglasses, "moustache": _draw_moustache}


def sprite_unit(face_unit_px: float) -> int:
    """The cached sprite size for a face: eye distance snapped to a geometric grid (few sizes, sharp warps)."""
    steps = round(math.log2(max(face_unit_px, 1e-6)) * SPRITE_STEPS_PER_OCTAVE)
    return int(min(SPRITE_MAX_UNIT, max(SPRITE_MIN_UNIT, round(2 ** (steps / SPRITE_STEPS_PER_OCTAVE)))))


@lru_cache(maxsize=SPRITE_CACHE_SIZE)
def get_sprite(kind: str, unit: int) -> Sprite:
    """The ``kind`` artwork drawn at ``unit`` pixels per face unit; drawn once per process and size."""
    return _PAINTERS[kind](unit)


# ---------------------------------------------------------------------------------------------
# Placing and blending
# ---------------------------------------------------------------------------------------------


def similarity(sprite: Sprite, center: np.ndarray, direction: np.ndarray, face_unit_px: float) -> np.ndarray:
    """The 2x3 map sprite pixels -> frame pixels: face-unit origin to ``center``, x axis along ``direction``."""
    dx, dy = np.asarray(direction, np.float64) / float(np.hypot(*direction))
    s = face_unit_px / sprite.unit
    a = np.array([[dx, -dy], [dy, dx]]) * s
    t = np.asarray(center, np.float64) - a @ np.asarray(sprite.anchor)
    return np.hstack([a, t[:, None]])


def _blend_premultiplied(roi: np.ndarray, bgra: np.ndarray) -> None:
    """roi <- bgra over roi, in place: roi * (255 - a) / 255 + colour, saturating uint8 SIMD ops on the rectangle."""
    color = cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR)
    keep = cv2.cvtColor(cv2.bitwise_not(cv2.extractChannel(bgra, 3)), cv2.COLOR_GRAY2BGR)
    roi[...] = cv2.add(cv2.multiply(roi, keep, scale=1 / 255), color)


def _blend_mask(roi: np.ndarray, effect: np.ndarray, mask: np.ndarray) -> None:
    """roi <- effect where mask (uint8 coverage) is set, in place; exact where mask is 0 or 255."""
    m = cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR)
    roi[...] = cv2.add(cv2.multiply(effect, m, scale=1 / 255), cv2.multiply(roi, cv2.bitwise_not(m), scale=1 / 255))


def _clip_rect(x0: float, y0: float, x1: float, y1: float, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """Integer rectangle [x0, x1) x [y0, y1) covering the float bounds, intersected with the frame; None if empty."""
    h, w = shape[:2]
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(w, math.ceil(x1) + 1), min(h, math.ceil(y1) + 1)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    return ix0, iy0, ix1, iy1


def paste_sprite(out: np.ndarray, sprite: Sprite, matrix: np.ndarray) -> None:
    """Warp ``sprite`` by ``matrix`` into ``out`` (in place), touching only the rectangle it covers in the frame."""
    h, w = sprite.bgra.shape[:2]
    corners = np.array([[-1, -1, 1], [w, -1, 1], [-1, h, 1], [w, h, 1]], np.float64) @ matrix.T
    rect = _clip_rect(*corners.min(0), *corners.max(0), out.shape)
    if rect is None:
        return
    x0, y0, x1, y1 = rect
    m = matrix.copy()
    m[:, 2] -= (x0, y0)
    warped = cv2.warpAffine(
        sprite.bgra, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    _blend_premultiplied(out[y0:y1, x0:x1], warped)


def _eye_centers(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subject's right eye centre, subject's left eye centre): means of the six points, stable under blinks."""
    return kp[RIGHT_EYE.start : RIGHT_EYE.stop].mean(0), kp[LEFT_EYE.start : LEFT_EYE.stop].mean(0)


def sunglasses_pose(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(centre, x direction, eye distance) for the sunglasses: the eye centres fix all three; None if degenerate."""
    right, left = _eye_centers(kp)
    eye_line = left - right
    d = float(np.hypot(*eye_line))
    if d < MIN_FACE_UNIT_PX:
        return None
    return (right + left) / 2, eye_line, d


def moustache_pose(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(centre, x direction, face unit) for the moustache from the nose bottom and mouth corners.

    The direction averages the mouth-corner line with the eye line and the size averages mouth
    width with eye distance, so a smile or an open mouth does not swing or swell the moustache.
    """
    right, left = _eye_centers(kp)
    eye_line = left - right
    mouth = kp[MOUTH_LEFT] - kp[MOUTH_RIGHT]
    d_eye, d_mouth = float(np.hypot(*eye_line)), float(np.hypot(*mouth))
    if max(d_eye, d_mouth) < MIN_FACE_UNIT_PX:
        return None
    direction = np.zeros(2)
    for v, n in ((eye_line, d_eye), (mouth, d_mouth)):
        if n >= MIN_FACE_UNIT_PX:
            direction += v / n
    if np.hypot(*direction) < 1e-3:
        return None
    if d_eye >= MIN_FACE_UNIT_PX and d_mouth >= MIN_FACE_UNIT_PX:
        unit = 0.5 * (d_eye + d_mouth / MOUTH_WIDTH_IN_EYE_UNITS)
    else:
        unit = d_eye if d_eye >= MIN_FACE_UNIT_PX else d_mouth / MOUTH_WIDTH_IN_EYE_UNITS
    nose = kp[SUBNASALE]
    mouth_mid = (kp[MOUTH_LEFT] + kp[MOUTH_RIGHT]) / 2
    return nose + MOUSTACHE_DROP * (mouth_mid - nose), direction, unit


def dress(
    frame: np.ndarray, keypoints: np.ndarray, kind: str, pose: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float] | None]
) -> np.ndarray:
    """A copy of ``frame`` with the ``kind`` sprite pasted on each face where ``pose(kp)`` puts it (centre, x axis, unit)."""
    _check_frame(frame)
    out = frame.copy()
    for kp in _valid_faces(keypoints):
        placed = pose(kp)
        if placed is None:
            continue
        center, direction, unit = placed
        sprite = get_sprite(kind, sprite_unit(unit))
        paste_sprite(out, sprite, similarity(sprite, center, direction, unit))
    return out


def sunglasses(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Dark tinted sunglasses over each face, placed, sized and rolled by the two eye centres."""
    return dress(frame, keypoints, "sunglasses", sunglasses_pose)


def moustache(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """A handlebar moustache between each face's nose bottom and mouth, rolled with the mouth and eyes."""
    return dress(frame, keypoints, "moustache", moustache_pose)


# ---------------------------------------------------------------------------------------------
# Anonymisation
# ---------------------------------------------------------------------------------------------


def _blurred(roi: np.ndarray, face_px: float) -> np.ndarray:
    """A strong Gaussian blur done at low resolution (cheap for any face size), back at roi size."""
    h, w = roi.shape[:2]
    f = max(1.0, face_px / BLUR_WORK_PX)
    small = cv2.resize(roi, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA) if f > 1 else roi
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, BLUR_SIGMA * face_px / f), borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) if f > 1 else small


def _pixelated(roi: np.ndarray, face_px: float) -> np.ndarray:
    """Block averages (about PIXELATE_BLOCKS across the face), shown as flat squares."""
    h, w = roi.shape[:2]
    block = max(2.0, face_px / PIXELATE_BLOCKS)
    small = cv2.resize(roi, (max(1, round(w / block)), max(1, round(h / block))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _feathered_mask(polygon: np.ndarray, shape: tuple[int, int], face_px: float, feather: float) -> np.ndarray:
    """uint8 coverage of a convex polygon with a Gaussian edge; drawn and feathered at about
    MASK_WORK_PX per face and scaled up (the edge is smooth, so nothing is lost, and a wide blur
    at full resolution would cost more than the rest of the filter)."""
    h, w = shape
    f = max(1.0, face_px / MASK_WORK_PX)
    sw, sh = max(1, math.ceil(w / f)), max(1, math.ceil(h / f))
    small = np.zeros((sh, sw), np.uint8)
    pts = (polygon + 0.5) * (sw / w, sh / h) - 0.5  # cv2.resize's pixel-centre convention
    cv2.fillConvexPoly(small, np.round(pts * _ONE).astype(np.int32), 255, cv2.LINE_AA, _FIXED_SHIFT)
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, feather / f))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) if (sw, sh) != (w, h) else small


def anonymize(frame: np.ndarray, keypoints: np.ndarray, effect: Callable[[np.ndarray, float], np.ndarray]) -> np.ndarray:
    """A copy of ``frame`` with ``effect(roi, face_px)`` shown inside each face's grown, feathered keypoint hull."""
    _check_frame(frame)
    out = frame.copy()
    for kp in _valid_faces(keypoints):
        hull = cv2.convexHull(kp.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        area = abs(cv2.contourArea(hull.astype(np.float32)))
        face_px = math.sqrt(area)
        if face_px < MIN_FACE_UNIT_PX:
            continue
        centroid = hull.mean(0)
        grown = centroid + (hull - centroid) * (1 + ANONYMIZE_MARGIN)
        feather = max(1.0, ANONYMIZE_FEATHER * face_px)
        pad = 3 * feather + 2
        rect = _clip_rect(*(grown.min(0) - pad), *(grown.max(0) + pad), out.shape)
        if rect is None:
            continue
        x0, y0, x1, y1 = rect
        roi = out[y0:y1, x0:x1]
        _blend_mask(roi, effect(roi, face_px), _feathered_mask(grown - (x0, y0), roi.shape[:2], face_px, feather))
    return out


def blur(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Anonymise each face with a strong blur inside its keypoint hull (plus margin, soft edge)."""
    return anonymize(frame, keypoints, _blurred)


def pixelate(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Anonymise each face with coarse blocks inside its keypoint hull (plus margin, soft edge)."""
    return anonymize(frame, keypoints, _pixelated)


# ---------------------------------------------------------------------------------------------
# Annotation overlays
# ---------------------------------------------------------------------------------------------


def keypoints_overlay(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The 68 dots and per-region contour lines of each face (the same drawing as :func:`fkp_core.viz.draw_keypoints`)."""
    # Imported here: fkp_core.viz pulls in torch (1+ s, ~200 MB), which a render-only worker need not load.
    from fkp_core.viz import draw_keypoints

    _check_frame(frame)
    faces = _valid_faces(keypoints)
    if not faces:
        return frame.copy()
    return draw_keypoints(frame, np.stack(faces).astype(np.float32), DEFAULT_KEYPOINT_BGR)


def box(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The detection rectangles (x, y, w, h), line width proportional to the box."""
    _check_frame(frame)
    out = frame.copy()
    h, w = out.shape[:2]
    for bx, by, bw, bh in _as_boxes(boxes):
        if not np.isfinite((bx, by, bw, bh)).all() or bw <= 0 or bh <= 0:
            continue
        t = max(1, round(BOX_THICKNESS * min(bw, bh)))
        lim_x, lim_y = (-2 * t - 2, w + 2 * t + 2), (-2 * t - 2, h + 2 * t + 2)  # clip: no int overflow, same pixels
        p0 = (int(np.clip(round(bx), *lim_x)), int(np.clip(round(by), *lim_y)))
        p1 = (int(np.clip(round(bx + bw - 1), *lim_x)), int(np.clip(round(by + bh - 1), *lim_y)))
        cv2.rectangle(out, p0, p1, BOX_BGR, t, cv2.LINE_AA)
    return out


# ---------------------------------------------------------------------------------------------
# Registry and composition
# ---------------------------------------------------------------------------------------------

def axis(frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Head-pose axes (yaw, pitch, roll from the keypoints) drawn at each face's nose."""
    from fkp_core.pose import draw_pose_axes, head_pose

    _check_frame(frame)
    faces = _valid_faces(keypoints)
    if not faces:
        return frame.copy()
    kp = np.stack(faces).astype(np.float32)
    return draw_pose_axes(frame, kp, head_pose(kp, (frame.shape[1], frame.shape[0])))


FILTERS: dict[str, Filter] = {
    "keypoints": keypoints_overlay,
    "axis": axis,
    "box": box,
    "sunglasses": sunglasses,
    "moustache": moustache,
    "blur": blur,
    "pixelate": pixelate,
}
"""Filter name -> filter. Extend with :func:`register_filter` (e.g. the head-pose ``axis`` filter)."""


def register_filter(name: str, fn: Filter, *, replace: bool = False) -> Filter:
    """Add ``fn`` to :data:`FILTERS` under ``name`` so that parse_filters and the CLI offer it; returns ``fn``."""
    if not _NAME.match(name):
        raise ValueError(f"filter name {name!r} must be lower-case letters, digits and '_' (no commas)")
    if not callable(fn):
        raise TypeError(f"filter {name!r} must be callable")
    if name in FILTERS and FILTERS[name] is not fn and not replace:
        raise ValueError(f"filter {name!r} is already registered (pass replace=True to override)")
    FILTERS[name] = fn
    return fn


def parse_filters(spec: str | Iterable[str] | None) -> list[str]:
    """``"sunglasses, moustache"`` -> ``["sunglasses", "moustache"]``, checked against :data:`FILTERS`.

    Names (not functions) come back so that they can be logged, stored with results and sent to
    Ray workers cheaply; :func:`apply_filters` looks them up. Case and blanks are ignored, as are
    empty items; an unknown name raises ValueError listing the valid ones.
    """
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"filter names must be strings, got {item!r}")
        name = item.strip().lower()
        if not name:
            continue
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; valid filters: {', '.join(sorted(FILTERS))}")
        names.append(name)
    return names


def apply_filters(
    frame: np.ndarray,
    boxes: np.ndarray | None,
    keypoints: np.ndarray | None,
    filters: str | Sequence[str | Filter],
) -> np.ndarray:
    """Apply ``filters`` (names, callables, or a comma-separated string) in order; a new frame, input untouched."""
    _check_frame(frame)
    steps: list[str | Filter] = parse_filters(filters) if isinstance(filters, str) else list(filters)
    fns = [FILTERS[parse_filters([s])[0]] if isinstance(s, str) else s for s in steps]
    b, k = _as_boxes(boxes), _as_keypoints(keypoints)
    out = frame.copy() if not fns else frame
    for fn in fns:
        out = fn(out, b, k)
    return out
