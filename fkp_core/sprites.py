"""The filters' artwork: sunglasses and a moustache drawn with OpenCV primitives, cached per size.

Each is drawn once per size bucket (:func:`sprite_unit`) as a premultiplied BGRA sprite in a
canonical face frame; :mod:`fkp_core.filters` warps it onto each face. The artwork is the project's
own; no image files are read. Canonical face frame ("face units"): the origin at the anchor named
per sprite, x towards the subject's left (the image's right in a frontal photo), y down, one unit =
the distance between the two eye centres.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

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

_FIXED_SHIFT = 4  # OpenCV drawing with 1/16-pixel coordinates
_ONE = 1 << _FIXED_SHIFT


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
