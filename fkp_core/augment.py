"""Training augmentations for faces in the wild: upright crops, occluders over the eyes and mouth, low light, codec artefacts.

They act on :class:`~fkp_core.transforms.Sample` like the transforms of :mod:`fkp_core.transforms`
(geometry composed into the pending matrix, photometry on the warped image) and are put together by
:func:`fkp_core.training.wild_transform`; inference never uses them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np

from fkp_core.constants import THREE_QUARTER_MAX_YAW
from fkp_core.transforms import CROP_MARGIN, Sample, _as_float, _with_image, crop_matrix, face_frame, materialize


class UprightFaceCrop:
    """The upright face crop (:func:`face_frame`: eyes level), with the spread of inference crops.

    At inference the first pass levels the crop by the detector's eye points and refine passes by
    the predicted keypoints, so the crop's roll is off by the error of those points:
    ``jitter_degrees`` (uniform) models it, ``jitter_scale``/``jitter_shift`` the box's spread as in
    :class:`FaceCrop`.
    """

    def __init__(self, size: int, margin: float = CROP_MARGIN, jitter_scale: float = 0.0, jitter_shift: float = 0.0,
                 jitter_degrees: float = 0.0):
        self.size, self.margin = size, margin
        self.jitter_scale, self.jitter_shift, self.jitter_degrees = jitter_scale, jitter_shift, jitter_degrees

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        if sample.pending:
            sample = materialize(sample)
        box, angle = face_frame(sample.keypoints, upright=True)
        box, angle = np.asarray(box, dtype=np.float64), float(angle)
        if rng is not None and (self.jitter_scale or self.jitter_shift or self.jitter_degrees):
            x, y, w, h = box
            s = math.exp(rng.uniform(-self.jitter_scale, self.jitter_scale))
            dx, dy = rng.uniform(-self.jitter_shift, self.jitter_shift, size=2) * max(w, h)
            cx, cy = x + w / 2 + dx, y + h / 2 + dy
            box = np.array([cx - w * s / 2, cy - h * s / 2, w * s, h * s])
            angle += math.radians(rng.uniform(-self.jitter_degrees, self.jitter_degrees))
        return sample.then(crop_matrix(box, self.size, self.margin, angle), (self.size, self.size))


class RandomNonFace:
    """Turn the sample into a crop with no face in it (``face=False``), for the learned keypoint scores.

    Moves the labels (and so the crop that follows them) off the face by one to two face sizes in a random
    direction, or, one time in five, blanks the image to a flat gray or noise: the kinds of crop a detector's
    false positives and a tracker's drift give. The labels no longer mark anything; training scores such a
    crop's points as lost (:data:`~fkp_core.constants.NONFACE_ERROR`) and fits no positions to it.
    """

    def __init__(self, p: float = 0.05):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        sample = materialize(sample) if sample.pending else sample
        if rng.random() < 0.2:
            shape = sample.image.shape
            flat = rng.random() < 0.5
            image = np.full(shape, rng.integers(0, 256), np.uint8) if flat else rng.integers(0, 256, shape).astype(np.uint8)
            return replace(sample, image=image, face=False)
        lo, hi = sample.keypoints.min(0), sample.keypoints.max(0)
        theta = rng.uniform(0, 2 * math.pi)
        shift = rng.uniform(1.0, 2.0) * float((hi - lo).max()) * np.array([math.cos(theta), math.sin(theta)])
        return replace(sample, keypoints=sample.keypoints + shift, face=False)


class RandomThreeQuarterView:
    """Turn the face about its vertical axis by up to ``max_degrees``: three-quarter views from frontal faces,
    where the jaw line leaves the frontal template (the near cheek widens, the far one narrows, the nose
    moves toward the far cheek).

    The head is a paraboloid of revolution over the keypoints' extent (a bit wider than the jaw, up to the
    forehead), seen orthographically; turning it by ``d`` shifts what is at x' in the output from
    ``x = c + (x' - c) cos d - depth(x', y) sin d`` in the input. The image is resampled through that map
    (``cv2.remap``) and each keypoint goes to the x' the map sends to it, so the labels stay on the content
    they mark; the map is one-to-one for turns below atan(0.5) (the depth's slope is at most 2), and what
    would come into view from behind the head is not made up. Acts on the warped crop.
    """

    def __init__(self, p: float = 0.2, max_degrees: float = THREE_QUARTER_MAX_YAW):
        if not 0 <= max_degrees < math.degrees(math.atan(0.5)):
            raise ValueError(f"max_degrees must be in [0, {math.degrees(math.atan(0.5)):.1f})")
        self.p, self.max_degrees = p, max_degrees

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p or not sample.face:
            return sample
        sample = materialize(sample)
        turn = math.radians(rng.uniform(-self.max_degrees, self.max_degrees))
        source_x = _turned_head_map(sample.keypoints, turn)
        h, w = sample.image.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        image = cv2.remap(sample.image, source_x(xs, ys).astype(np.float32), ys, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
        grid = np.linspace(-w, 2 * w, 12 * w, dtype=np.float64)  # the map is increasing in x': invert it per row
        moved = np.array([np.interp(x, source_x(grid, np.full_like(grid, y)), grid) for x, y in sample.keypoints])
        keypoints = np.stack([moved, sample.keypoints[:, 1]], 1).astype(np.float32)
        return replace(sample, image=image, keypoints=keypoints)


def _turned_head_map(keypoints: np.ndarray, turn: float):
    """``(x', y) -> x``: where the face turned by ``turn`` radians takes each output column from."""
    lo, hi = keypoints.min(0).astype(np.float64), keypoints.max(0).astype(np.float64)
    width, height = hi - lo
    cx = (lo[0] + hi[0]) / 2
    cy = hi[1] - 0.75 * height  # the head runs from the chin to a forehead half a face above the brows
    a, b = 0.575 * width, 0.8 * height
    cos, sin = math.cos(turn), math.sin(turn)

    def source_x(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        depth = a * np.clip(1 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2, 0, None)
        return cx + (x - cx) * cos - depth * sin

    return source_x


def _region_ellipse(points: np.ndarray, grow: float) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = points.min(0), points.max(0)
    centre = (lo + hi) / 2
    half = np.maximum((hi - lo) / 2 * grow, 2.0)
    return (float(centre[0]), float(centre[1])), (float(half[0]), float(half[1]))


class RandomFaceOccluder:
    """Cover the mouth, one or both eyes (or the lower face) with an object: hands, cups, phones, glasses, hair.

    Placed from the keypoints of the warped sample (the labels stay where the hidden points are),
    shaped as a rectangle, an ellipse or a hand-like blob (a palm with finger bars), filled flat,
    with a texture of noise, or with a gradient, so the network learns to infer hidden points from
    the rest of the face instead of following the occluder's edges.
    """

    REGIONS = {"mouth": list(range(48, 68)), "right_eye": list(range(36, 42)), "left_eye": list(range(42, 48)),
               "eyes": list(range(36, 48)), "lower": list(range(3, 14)) + list(range(48, 68))}

    def __init__(self, p: float = 0.3):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        sample = materialize(sample)
        img = _as_float(sample.image).copy()
        h, w = img.shape[:2]
        region = ["mouth", "mouth", "right_eye", "left_eye", "eyes", "lower"][int(rng.integers(0, 6))]
        (cx, cy), (ax, ay) = _region_ellipse(sample.keypoints[self.REGIONS[region]], rng.uniform(1.0, 1.8))
        cx += rng.normal(0, 0.25) * ax
        cy += rng.normal(0, 0.25) * ay
        mask = np.zeros((h, w), np.uint8)
        shape = int(rng.integers(0, 3))
        if shape == 0:
            cv2.rectangle(mask, (int(cx - ax), int(cy - ay)), (int(cx + ax), int(cy + ay)), 255, -1)
        elif shape == 1:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(-30, 30)), 0, 360, 255, -1)
        else:  # a hand: palm ellipse and four finger bars reaching across the region
            cv2.ellipse(mask, (int(cx), int(cy + ay * 0.4)), (int(ax * 0.8), int(ay * 0.9)), 0, 0, 360, 255, -1)
            tilt = rng.uniform(-0.6, 0.6)
            for k in range(4):
                fx = cx - ax * 0.75 + k * ax * 0.5
                top = (int(fx + tilt * ay * 1.6), int(cy - ay * 1.6))
                cv2.line(mask, (int(fx), int(cy + ay * 0.4)), top, 255, max(2, int(ax * 0.35)))
        fill = int(rng.integers(0, 3))
        level = rng.uniform(0.05, 0.95)
        if fill == 0:
            patch = np.full((h, w), level, np.float32)
        elif fill == 1:
            patch = cv2.GaussianBlur(rng.uniform(0, 1, size=(h, w)).astype(np.float32), (0, 0), rng.uniform(0.5, 3.0))
            patch = np.clip(level + (patch - 0.5) * rng.uniform(0.2, 1.0), 0, 1)
        else:
            ramp = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.ones((h, 1), np.float32)
            patch = np.clip(level + ramp * rng.uniform(-0.6, 0.6), 0, 1)
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), rng.uniform(0.3, 1.5))
        if img.ndim == 3:
            soft, patch = soft[..., None], patch[..., None]
        return _with_image(sample, (img * (1 - soft) + patch * soft).astype(np.float32))


class RandomLowLight:
    """Dim, contrast-poor frames: darken (gain, gamma > 1), then sensor noise that grows as light falls, then 8-bit levels."""

    def __init__(self, p: float = 0.2, min_gain: float = 0.15, max_gamma: float = 2.0, max_noise: float = 0.05):
        self.p, self.min_gain, self.max_gamma, self.max_noise = p, min_gain, max_gamma, max_noise

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        img = _as_float(materialize(sample).image)
        gain = math.exp(rng.uniform(math.log(self.min_gain), 0.0))
        img = np.power(np.clip(img, 0, 1), rng.uniform(1.0, self.max_gamma)) * gain
        sigma = rng.uniform(0.0, self.max_noise) * (1.0 - 0.5 * gain)
        img = img + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        img = np.round(np.clip(img, 0, 1) * 255) / 255
        return _with_image(sample, img.astype(np.float32))


class RandomMotionBlur:
    """Blur along a random direction (moving heads, long exposures)."""

    def __init__(self, max_length: int = 7, p: float = 0.15):
        self.max_length, self.p = max_length, p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        img = _as_float(materialize(sample).image)
        n = int(rng.integers(3, self.max_length + 1))
        kernel = np.zeros((n, n), np.float32)
        kernel[n // 2, :] = 1.0
        rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (n, n))
        kernel /= max(float(kernel.sum()), 1e-6)
        return _with_image(sample, cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE))


class RandomJpeg:
    """JPEG round trip at a random quality: the blocking and ringing of compressed video and photos."""

    def __init__(self, quality: tuple[int, int] = (10, 70), p: float = 0.3):
        self.quality, self.p = quality, p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        sample = materialize(sample)
        img = sample.image
        u8 = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        q = int(rng.integers(self.quality[0], self.quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            return sample
        flag = cv2.IMREAD_UNCHANGED
        return _with_image(sample, _as_float(cv2.imdecode(buf, flag)))
