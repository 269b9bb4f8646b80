"""Fit consistency: is the fast path's keypoint fit still on the face?

The fast path (track without detecting) crops the next frame around :func:`crop_box_from_keypoints`
of a track's (predicted) keypoints, predicts keypoints there and calls :func:`keypoint_consistency`;
a score under :data:`~ConsistencyConfig.redetect_below` means the fit is lost and the detector
should run again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fkp_core.constants import LEFT_EYE_OUTER, NUM_KEYPOINTS, RIGHT_EYE_OUTER
from fkp_core.transforms import CROP_MARGIN, box_from_keypoints, face_frame

# The fast path crops where the training crops were made: around the keypoints' Haar-like box.
crop_box_from_keypoints = box_from_keypoints

# ---- fit consistency (the fast path's "re-detect now" test) ----
REDETECT_BELOW = 0.5


def align_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(K, 2) ``src`` moved by the least-squares similarity (shift, rotation, scale) that best maps it onto ``dst``.

    What is left between the result and ``dst`` is the non-rigid part of the change (expression,
    out-of-plane rotation, noise or a broken fit).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    p, q = src - ms, dst - md
    denom = float((p * p).sum())
    if denom <= 0:
        return np.broadcast_to(md, src.shape).copy()
    a = float((p * q).sum()) / denom
    b = float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()) / denom
    return md + p @ np.array([[a, b], [-b, a]])


@dataclass(frozen=True)
class ConsistencyConfig:
    """Ramps of :func:`keypoint_consistency`: each term is 1 up to ``*_ok`` and falls linearly to 0 at ``*_bad``.

    Distances are in face sizes of the previous keypoints. ``interocular_*`` bound the ratio of
    the outer-eye-corner distance to the face size (0.58 on a frontal face, ~0.3 at 60 degrees of
    yaw). The defaults let a face move a tenth of its size and change shape by a few percent per
    frame (fast head motion, talking, detector noise) at full score.
    """

    motion_ok: float = 0.10
    motion_bad: float = 0.40
    shape_ok: float = 0.04
    shape_bad: float = 0.15
    interocular_low_bad: float = 0.12
    interocular_low_ok: float = 0.25
    interocular_high_ok: float = 0.80
    interocular_high_bad: float = 1.00
    outside_ok: float = 0.0  # fraction of points outside the crop
    outside_bad: float = 0.25
    margin: float = CROP_MARGIN  # the crop the points were predicted in: the previous box plus this margin
    redetect_below: float = REDETECT_BELOW


def _ramp_down(x: float, ok: float, bad: float) -> float:
    """1 for x <= ok, 0 for x >= bad, linear between."""
    if x <= ok:
        return 1.0
    if x >= bad:
        return 0.0
    return (bad - x) / (bad - ok)


def keypoint_consistency(
    reference: np.ndarray, keypoints: np.ndarray, config: ConsistencyConfig | None = None, upright: bool = False
) -> float:
    """How believable a face's new (68, 2) keypoints are: 1 good ... 0 lost (the fast path re-detects under 0.5).

    ``reference`` is either the face's previous (68, 2) keypoints or the (4,) xywh box the new
    keypoints were predicted in (its crop is that box plus ``config.margin``; for the fast path
    that box is :func:`crop_box_from_keypoints` of the previous keypoints). The score is the
    product of terms, each a ramp of :class:`ConsistencyConfig`:

    * motion: mean point displacement from the previous keypoints (or mean corner displacement
      of the new keypoints' Haar-like box from the reference box) over the reference face size:
      a fit that jumped away, or a crop the fit no longer sits in;
    * shape (keypoint reference only): mean residual after the best similarity transform from
      the previous points to the new, over the face size: a fit that broke up, while head motion,
      scale and roll cost nothing;
    * plausibility: inter-ocular distance over the new face size: a collapsed or stretched fit;
    * crop: fraction of the new points outside the reference crop.

    Under ``config.redetect_below`` (0.5: one term at its midpoint, or two terms a third of the
    way down) the fit counts as lost.
    """
    cfg = config or ConsistencyConfig()
    ref = np.asarray(reference, np.float64)
    new = np.asarray(keypoints, np.float64)
    if new.shape != (NUM_KEYPOINTS, 2) or ref.shape not in ((4,), (NUM_KEYPOINTS, 2)):
        raise ValueError(f"expected a (4,) or (68, 2) reference and (68, 2) keypoints, got {ref.shape}, {new.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(new).all()):
        return 0.0
    box = ref if ref.shape == (4,) else crop_box_from_keypoints(ref)
    size = float(max(box[2], box[3]))
    new_box = face_frame(new, upright)[0] if upright else crop_box_from_keypoints(new)  # framed as the reference crop was
    new_size = float(new_box[2])
    if size <= 0 or new_size <= 0:
        return 0.0
    if ref.shape == (4,):
        corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)
        old_c = box[:2] + corners * box[2:]
        new_c = new_box[:2] + corners * new_box[2:]
        motion = float(np.linalg.norm(new_c - old_c, axis=-1).mean()) / size
        shape = 0.0
    else:
        motion = float(np.linalg.norm(new - ref, axis=-1).mean()) / size
        shape = float(np.linalg.norm(new - align_similarity(ref, new), axis=-1).mean()) / size
    ratio = float(np.linalg.norm(new[RIGHT_EYE_OUTER] - new[LEFT_EYE_OUTER])) / new_size
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * cfg.margin)
    outside = float((np.abs(new - [x + w / 2, y + h / 2]).max(axis=-1) > side / 2).mean())
    score = (
        _ramp_down(motion, cfg.motion_ok, cfg.motion_bad)
        * _ramp_down(shape, cfg.shape_ok, cfg.shape_bad)
        * _ramp_down(-ratio, -cfg.interocular_low_ok, -cfg.interocular_low_bad)
        * _ramp_down(ratio, cfg.interocular_high_ok, cfg.interocular_high_bad)
        * _ramp_down(outside, cfg.outside_ok, cfg.outside_bad)
    )
    return float(score)
