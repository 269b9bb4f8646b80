"""Filters: locality, no-ops, rotation following, frame borders, several faces, parsing, composition.

Faces are generated (conftest.mean_face / face_image) so every expectation is known exactly.

Locality margin: a filter may change pixels only within the keypoints' convex hull dilated by
LOCAL_MARGIN = 30 % of the face size (the keypoints' largest extent, i.e. the jaw width). The
widest effects stay well inside that: the sunglasses reach 1.18 eye distances from the eye
midpoint (about 0.53 face widths, 3-4 % beyond the jaw line), the anonymised area is the hull
grown by 15 % of its radius plus a 3-sigma feather of 3 % of the face (about 15 % in all) and
the keypoint dots have radius 1/60 face. 30 % leaves room for rounding and rotation, yet an
overlay misplaced by a fraction of a face, drawn at twice the size, or wrapped round the frame
edge by negative indexing lands outside it. SLACK_PX more covers antialiased edges and the
keypoint dots' 1-pixel minimum radius, which on a 5-pixel face exceeds 30 % of it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from conftest import face_image, mean_face
from fkp_core import filters as F
from fkp_core.constants import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, RIGHT_EYE, SUBNASALE
from fkp_core.filters import (
    FILTERS,
    apply_filters,
    get_sprite,
    parse_filters,
    register_filter,
    sprite_unit,
)

H, W = 480, 640
LOCAL_MARGIN = 0.3
SLACK_PX = 3.0  # plus this much: antialiasing, and the 1-pixel minimum dot radius on tiny faces
BUILTIN = ("keypoints", "box", "sunglasses", "moustache", "blur", "pixelate", "axis")
FACE_FILTERS = tuple(n for n in BUILTIN if n != "box")  # the ones placed by keypoints


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def rotate(kp: np.ndarray, degrees: float, center: np.ndarray | None = None) -> np.ndarray:
    """Keypoints rotated by ``degrees`` (counter-clockwise on screen: image y points down) about ``center``."""
    c = kp.mean(0) if center is None else np.asarray(center, np.float64)
    t = math.radians(-degrees)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return ((kp - c) @ r.T + c).astype(np.float32)


def box_of(kp: np.ndarray) -> np.ndarray:
    """A Haar-like square box (x, y, w, h) around a face's keypoints."""
    lo, hi = kp.min(0), kp.max(0)
    side = 1.1 * float((hi - lo).max())
    cx, cy = (lo + hi) / 2
    return np.array([cx - side / 2, cy - 0.6 * side, side, side])


def scene(kps: list[np.ndarray], shape: tuple[int, int] = (H, W), seed: int = 0) -> np.ndarray:
    """A BGR frame with a drawn face under each keypoint set (noise background)."""
    img = face_image(kps[0], shape, seed) if kps else face_image(mean_face(1, (-99, -99)), shape, seed)
    for k in kps[1:]:
        face = face_image(k, shape, seed)
        m = np.zeros(shape, np.uint8)
        cv2.fillConvexPoly(m, cv2.convexHull(np.round(k).astype(np.int32)), 1)
        img = np.where(m > 0, face, img)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def faces(*kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (N, 4) int32, keypoints (N, 68, 2) float32) like landmarks.Faces."""
    k = np.stack(kps).astype(np.float32) if kps else np.zeros((0, 68, 2), np.float32)
    b = np.stack([box_of(x) for x in kps]).round().astype(np.int32) if kps else np.zeros((0, 4), np.int32)
    return b, k


def changed(a: np.ndarray, b: np.ndarray, threshold: int = 0) -> np.ndarray:
    """(H, W) bool: pixels where any channel differs by more than ``threshold``."""
    return (np.abs(a.astype(np.int16) - b.astype(np.int16)) > threshold).any(axis=2)


def near_faces(kps: np.ndarray, shape: tuple[int, int], margin: float = LOCAL_MARGIN) -> np.ndarray:
    """(H, W) bool: within ``margin`` face sizes of a face's keypoint hull (drawn on a padded canvas so
    the parts of a face outside the frame count too)."""
    out = np.zeros(shape, bool)
    for kp in kps:
        if not np.isfinite(kp).all():
            continue
        r = margin * float(np.ptp(kp, axis=0).max()) + SLACK_PX
        pad = int(math.ceil(r)) + 2
        lo = np.floor(kp.min(0)).astype(int) - pad
        hi = np.ceil(kp.max(0)).astype(int) + pad
        x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], shape[1]), min(hi[1], shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        canvas = np.full((hi[1] - lo[1], hi[0] - lo[0]), 255, np.uint8)
        cv2.fillConvexPoly(canvas, cv2.convexHull(np.round(kp - lo).astype(np.int32)), 0)
        dist = cv2.distanceTransform(canvas, cv2.DIST_L2, 5)
        out[y0:y1, x0:x1] |= dist[y0 - lo[1] : y1 - lo[1], x0 - lo[0] : x1 - lo[0]] <= r
    return out


def near_boxes(boxes: np.ndarray, shape: tuple[int, int], pad: int) -> np.ndarray:
    out = np.zeros(shape, bool)
    for x, y, w, h in np.asarray(boxes, np.int64):
        out[max(0, y - pad) : max(0, y + h + pad), max(0, x - pad) : max(0, x + w + pad)] = True
    return out


def allowed(name: str, boxes: np.ndarray, kps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if name == "box":
        return near_boxes(boxes, shape, pad=int(np.max(boxes[:, 2:], initial=0) * F.BOX_THICKNESS) + 3)
    return near_faces(kps, shape)


def orientation(mask: np.ndarray) -> tuple[float, np.ndarray]:
    """(principal-axis angle in degrees, in image coordinates like atan2(dy, dx); centroid (x, y))."""
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    angle = 0.5 * math.degrees(math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"]))
    return angle, np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


def angle_diff(a: float, b: float) -> float:
    """Difference of two axis angles (mod 180) in degrees."""
    return abs((a - b + 90) % 180 - 90)


def eye_centres(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return kp[list(RIGHT_EYE)].mean(0), kp[list(LEFT_EYE)].mean(0)


def run_filter(name: str, frame: np.ndarray, boxes: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Apply one filter and check the contract every filter keeps: new array, same shape/dtype, input untouched."""
    before = frame.copy()
    frame.flags.writeable = False  # any in-place write to the input would raise
    try:
        out = FILTERS[name](frame, boxes, kps)
    finally:
        frame.flags.writeable = True
    assert np.array_equal(frame, before)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, frame)
    return out


# ---------------------------------------------------------------------------------------------
# locality and no-ops
# ---------------------------------------------------------------------------------------------


def test_registry_has_the_builtin_filters():
    assert set(BUILTIN) <= set(FILTERS)
    assert all(callable(f) for f in FILTERS.values())


@pytest.mark.parametrize("name", BUILTIN)
def test_filter_changes_pixels_only_near_its_face(name):
    kp = mean_face(180, (300, 230))
    boxes, kps = faces(kp)
    frame = scene([kp])
    out = run_filter(name, frame, boxes, kps)
    diff = changed(out, frame)
    near = allowed(name, boxes, kps, (H, W))
    assert diff.sum() > 300, "the filter should visibly change the face"
    assert not (diff & ~near).any(), f"{name} changed {int((diff & ~near).sum())} pixels away from the face"


def test_box_draws_only_the_outline():
    kp = mean_face(180, (300, 230))
    boxes, kps = faces(kp)
    frame = scene([kp])
    diff = changed(run_filter("box", frame, boxes, kps), frame)
    x, y, w, h = boxes[0]
    t = max(1, round(F.BOX_THICKNESS * min(w, h)))
    inner = np.zeros_like(diff)
    inner[y + t + 2 : y + h - t - 2, x + t + 2 : x + w - t - 2] = True
    assert not (diff & inner).any()
    assert diff[y, x + w // 2] and diff[y + h // 2, x] and diff[y + h - 1, x + w // 2] and diff[y + h // 2, x + w - 1]


@pytest.mark.parametrize("name", BUILTIN)
def test_zero_faces_leave_the_frame_unchanged(name):
    frame = scene([mean_face(150, (320, 240))])
    boxes, kps = faces()
    out = run_filter(name, frame, boxes, kps)
    assert np.array_equal(out, frame)


def test_apply_filters_with_zero_faces_or_no_filters_is_identity():
    frame = scene([mean_face(150, (320, 240))])
    out = apply_filters(frame, np.zeros((0, 4), np.int32), np.zeros((0, 68, 2), np.float32), list(FILTERS))
    assert np.array_equal(out, frame)
    boxes, kps = faces(mean_face(150, (320, 240)))
    out = apply_filters(frame, boxes, kps, [])
    assert np.array_equal(out, frame) and not np.shares_memory(out, frame)


def test_faces_with_missing_keypoints_are_skipped():
    good, bad = mean_face(120, (160, 200)), np.full((68, 2), np.nan, np.float32)
    frame = scene([good])
    for name in FACE_FILTERS:
        both = run_filter(name, frame, np.zeros((0, 4)), np.stack([good, bad]))
        alone = run_filter(name, frame, np.zeros((0, 4)), good[None])
        assert np.array_equal(both, alone), name


# ---------------------------------------------------------------------------------------------
# alignment: position, scale and roll follow the keypoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [-25.0, 0.0, 25.0, 40.0])
def test_sunglasses_follow_the_eye_line(degrees):
    kp = rotate(mean_face(200, (320, 250)), degrees)
    frame = scene([kp])
    out = run_filter("sunglasses", frame, *faces(kp))
    mask = changed(out, frame, threshold=8)
    right, left = eye_centres(kp)
    eye_line = left - right
    d = float(np.hypot(*eye_line))
    expected = math.degrees(math.atan2(eye_line[1], eye_line[0]))
    angle, centroid = orientation(mask)
    assert angle_diff(angle, expected) < 3.0, (angle, expected)
    # Centred on the eyes (the lenses sit a little below the eye centres, the temples above) ...
    assert np.hypot(*(centroid - (right + left) / 2)) < 0.12 * d
    # ... and as wide as the artwork: 2.36 eye distances along the eye line.
    ys, xs = np.nonzero(mask)
    along = (np.stack([xs, ys], 1) - (right + left) / 2) @ (eye_line / d)
    assert abs((along.max() - along.min()) / d - 2.36) < 0.15
    # Dark lenses over the eyes.
    for eye in (right, left):
        x, y = np.round(eye).astype(int)
        assert out[y - 3 : y + 4, x - 3 : x + 4].mean() < 110


@pytest.mark.parametrize("degrees", [-25.0, 25.0])
def test_moustache_sits_under_the_nose_and_rolls_with_the_face(degrees):
    kp = rotate(mean_face(200, (320, 250)), degrees)
    frame = scene([kp])
    out = run_filter("moustache", frame, *faces(kp))
    mask = changed(out, frame, threshold=8)
    right, left = eye_centres(kp)
    expected = math.degrees(math.atan2(*(left - right)[::-1]))
    angle, centroid = orientation(mask)
    assert angle_diff(angle, expected) < 4.0, (angle, expected)
    nose, mouth_mid = kp[SUBNASALE], (kp[MOUTH_LEFT] + kp[MOUTH_RIGHT]) / 2
    target = nose + F.MOUSTACHE_DROP * (mouth_mid - nose)
    assert np.hypot(*(centroid - target)) < 0.15 * np.hypot(*(left - right))


def test_overlays_scale_with_the_face():
    widths = []
    for size in (80, 160, 320):
        kp = mean_face(size, (320, 240))
        frame = scene([kp])
        mask = changed(run_filter("sunglasses", frame, *faces(kp)), frame, threshold=8)
        xs = np.nonzero(mask)[1]
        widths.append(xs.max() - xs.min())
    assert 1.8 < widths[1] / widths[0] < 2.2 and 1.8 < widths[2] / widths[1] < 2.2


# ---------------------------------------------------------------------------------------------
# frame borders
# ---------------------------------------------------------------------------------------------

PLACEMENTS = {
    "top-left corner": (160, (0.0, 0.0)),
    "across right edge": (200, (W + 20.0, 240.0)),
    "mostly outside left": (200, (-70.0, 240.0)),
    "mostly outside bottom": (200, (320.0, H + 80.0)),
    "entirely outside": (150, (-400.0, -300.0)),
    "far away": (150, (1e5, -1e5)),
    "larger than the frame": (1500, (320.0, 200.0)),
    "tiny": (5, (320.0, 240.0)),
}


@pytest.mark.parametrize("where", list(PLACEMENTS))
@pytest.mark.parametrize("name", BUILTIN)
def test_faces_at_or_beyond_the_border(name, where):
    size, center = PLACEMENTS[where]
    kp = mean_face(size, center)
    boxes, kps = faces(kp)
    frame = scene([mean_face(150, (320, 240))])
    out = run_filter(name, frame, boxes, kps)
    diff = changed(out, frame)
    assert not (diff & ~allowed(name, boxes, kps, (H, W))).any(), "changed pixels away from the face (wrap-around?)"
    if where in ("entirely outside", "far away"):
        assert not diff.any()


def test_face_mostly_outside_does_not_wrap_to_the_other_side():
    kp = mean_face(200, (-35.0, 240.0))  # centre left of the frame: negative indices would wrap right
    frame = scene([mean_face(150, (420, 240))])
    for name in BUILTIN:
        out = run_filter(name, frame, *faces(kp))
        assert np.array_equal(out[:, W // 2 :], frame[:, W // 2 :]), name
        if name != "box":
            assert changed(out, frame)[:, :60].any(), f"{name}: the visible part of the face should change"


# ---------------------------------------------------------------------------------------------
# several faces
# ---------------------------------------------------------------------------------------------


def test_each_of_several_faces_gets_its_overlay():
    kps = [mean_face(150, (120, 150)), rotate(mean_face(120, (420, 130)), 20), mean_face(90, (300, 380))]
    boxes, k = faces(*kps)
    frame = scene(kps)
    for name in BUILTIN:
        out = run_filter(name, frame, boxes, k)
        # The same as dressing the faces one at a time (their effects do not interact) ...
        one_by_one = frame
        for i in range(len(kps)):
            one_by_one = FILTERS[name](one_by_one, boxes[i : i + 1], k[i : i + 1])
        assert np.array_equal(out, one_by_one), name
        # ... and every face is dressed, only near itself.
        diff = changed(out, frame)
        for i in range(len(kps)):
            assert (diff & allowed(name, boxes[i : i + 1], k[i : i + 1], (H, W))).sum() > 100, (name, i)
        assert not (diff & ~allowed(name, boxes, k, (H, W))).any(), name


# ---------------------------------------------------------------------------------------------
# parsing, composition, registry
# ---------------------------------------------------------------------------------------------


def test_parse_filters():
    assert parse_filters("sunglasses,moustache") == ["sunglasses", "moustache"]
    assert parse_filters(" Blur , keypoints ,") == ["blur", "keypoints"]
    assert parse_filters(["box", "pixelate"]) == ["box", "pixelate"]
    assert parse_filters("") == [] and parse_filters(None) == []


@pytest.mark.parametrize("spec", ["sunglasses,hat", "hat", ["blur", "hat"]])
def test_parse_filters_rejects_unknown_names_and_lists_the_valid_ones(spec):
    with pytest.raises(ValueError) as err:
        parse_filters(spec)
    message = str(err.value)
    assert "'hat'" in message
    assert all(name in message for name in FILTERS)


def test_apply_filters_rejects_unknown_names_and_bad_frames():
    kp = mean_face(100, (100, 100))
    frame = scene([kp])
    with pytest.raises(ValueError, match="hat"):
        apply_filters(frame, *faces(kp), "blur,hat")
    with pytest.raises(ValueError, match="BGR uint8"):
        apply_filters(frame[..., 0], *faces(kp), "blur")
    with pytest.raises(ValueError, match="keypoints"):
        apply_filters(frame, None, np.zeros((1, 5, 2)), "blur")


def test_composition_applies_filters_in_order():
    kp = mean_face(200, (320, 240))
    boxes, kps = faces(kp)
    frame = scene([kp])
    pts = np.round(kp).astype(int)
    green = np.array(F.DEFAULT_KEYPOINT_BGR, np.uint8)

    blur_then_dots = apply_filters(frame, boxes, kps, "blur,keypoints")
    assert np.array_equal(blur_then_dots, FILTERS["keypoints"](FILTERS["blur"](frame, boxes, kps), boxes, kps))
    on_dots = blur_then_dots[pts[:, 1], pts[:, 0]]
    assert (on_dots == green).all(axis=1).mean() > 0.95  # the dots drawn last stay visible

    dots_then_blur = apply_filters(frame, boxes, kps, ["keypoints", "blur"])
    on_dots = dots_then_blur[pts[:, 1], pts[:, 0]].astype(int)
    assert (np.abs(on_dots - green).max(axis=1) < 20).mean() < 0.1  # blurred away

    both = apply_filters(frame, boxes, kps, parse_filters("sunglasses,moustache"))
    assert np.array_equal(both, FILTERS["moustache"](FILTERS["sunglasses"](frame, boxes, kps), boxes, kps))
    assert np.array_equal(frame, scene([kp]))  # the input is never modified


def test_register_filter_extends_the_registry(monkeypatch):
    monkeypatch.setattr(F, "FILTERS", dict(F.FILTERS))

    def corner(frame, boxes, keypoints):
        out = frame.copy()
        out[0, 0] = 255
        return out

    register_filter("corner", corner)
    assert "corner" in F.FILTERS and F.parse_filters("sunglasses,corner") == ["sunglasses", "corner"]
    frame = np.zeros((10, 10, 3), np.uint8)
    assert F.apply_filters(frame, None, None, "corner")[0, 0, 0] == 255
    assert F.apply_filters(frame, None, None, [corner])[0, 0, 0] == 255  # callables work too
    with pytest.raises(ValueError, match="already registered"):
        register_filter("corner", lambda f, b, k: f.copy())
    register_filter("corner", corner)  # re-registering the same function is harmless
    with pytest.raises(ValueError, match="name"):
        register_filter("Bad,Name", corner)


# ---------------------------------------------------------------------------------------------
# sprites
# ---------------------------------------------------------------------------------------------


def test_sprites_are_cached_per_size_bucket_and_premultiplied():
    assert sprite_unit(40.0) == sprite_unit(41.0)
    for d in (3.0, 17.0, 40.0, 93.0, 300.0):
        u = sprite_unit(d)
        assert F.SPRITE_MIN_UNIT <= u <= F.SPRITE_MAX_UNIT
        if F.SPRITE_MIN_UNIT * 1.1 < d < F.SPRITE_MAX_UNIT:
            assert 0.9 < d / u < 1.1  # the warp only fine-tunes the scale
    for kind in ("sunglasses", "moustache"):
        s = get_sprite(kind, 32)
        assert get_sprite(kind, 32) is s  # drawn once
        assert not s.bgra.flags.writeable
        assert (s.bgra[..., :3] <= s.bgra[..., 3:]).all()  # premultiplied: no overflow when blending
        assert s.bgra[..., 3].max() >= 240 and s.bgra[0, 0, 3] == 0  # (nearly) opaque body, transparent corners
    assert get_sprite("sunglasses", 32).bgra[..., 3].max() == 255  # the frame is solid
