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

The artwork is the project's own, drawn with OpenCV primitives (:mod:`fkp_core.sprites`); no image files are read.
Canonical face frame ("face units"): the origin at the anchor named per sprite, x towards the
subject's left (the image's right in a frontal photo), y down, one unit = the distance between
the two eye centres.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

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
from fkp_core.sprites import (  # noqa: F401 - the sprite grid bounds stay reachable here as before
    _FIXED_SHIFT,
    _ONE,
    MOUSTACHE_DROP,
    SPRITE_MAX_UNIT,
    SPRITE_MIN_UNIT,
    Sprite,
    get_sprite,
    sprite_unit,
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

# The moustache's face unit: the eye distance averaged with the mouth width in eye units.
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
