"""Matching faces to tracks: the cost shared by the online tracker and by stitching across segments.

A track's keypoints are predicted at the new frame with a constant velocity (estimated over its
last few observations), then for each (track, face) pair

    cost = iou_weight * (1 - IoU(predicted box, face box))
         + (1 - iou_weight) * mean keypoint distance / face size / max_distance

where the face size is the side of the Haar-like box :func:`~fkp_core.transforms.box_from_keypoints`
puts around the predicted keypoints. Pairs further apart than ``max_distance`` face sizes (the
gate widens by ``gap_widening`` per missed frame) or with an IoU under ``min_iou`` never match;
the rest are matched optimally (a small Hungarian solver: N is a handful of faces).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.detector import iou
from fkp_core.transforms import box_from_keypoints

# ---- matching defaults (face-size units: 1.0 = the side of the face's Haar-like box) ----
DEFAULT_MAX_DISTANCE = 0.5  # mean keypoint distance (after prediction) beyond which a pair never matches
DEFAULT_MIN_IOU = 0.05  # box IoU (after prediction) under which a pair never matches
DEFAULT_IOU_WEIGHT = 0.5  # share of (1 - IoU) in the cost; the rest is the keypoint distance
DEFAULT_MAX_GAP = 10  # frames a track may go unmatched and still continue (1/3 s at 30 fps)
DEFAULT_GAP_WIDENING = 0.1  # the distance gate grows by this fraction per missed frame
VELOCITY_WINDOW = 3  # velocity = displacement over (up to) the last 3 frame steps / their frames
_INFEASIBLE = 1e6  # cost of a gated-out pair inside the assignment solver


@dataclass(frozen=True)
class TrackerConfig:
    """How faces are matched between frames (distances in face sizes, gaps in frames)."""

    max_distance: float = DEFAULT_MAX_DISTANCE
    min_iou: float = DEFAULT_MIN_IOU
    iou_weight: float = DEFAULT_IOU_WEIGHT
    max_gap: int = DEFAULT_MAX_GAP
    gap_widening: float = DEFAULT_GAP_WIDENING
    velocity_window: int = VELOCITY_WINDOW

    def __post_init__(self) -> None:
        if not self.max_distance > 0:
            raise ValueError(f"max_distance must be > 0, got {self.max_distance}")
        if not 0 <= self.min_iou < 1 or not 0 <= self.iou_weight <= 1:
            raise ValueError("min_iou must be in [0, 1) and iou_weight in [0, 1]")
        if self.max_gap < 0 or self.gap_widening < 0 or self.velocity_window < 1:
            raise ValueError("max_gap and gap_widening must be >= 0, velocity_window >= 1")



def face_size(keypoints: np.ndarray) -> np.ndarray:
    """Side of the Haar-like box of (..., 68, 2) keypoints, (...): the unit of every tracking distance."""
    return box_from_keypoints(keypoints)[..., 2]



def linear_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching of a rectangular (N, M) cost matrix: (rows, cols), min(N, M) pairs.

    The Hungarian method with potentials (Kuhn-Munkres, O(n^2 m)); ties go to the lower index,
    so the result is deterministic. scipy's linear_sum_assignment does the same; scipy is not a
    dependency.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite (use a large value for forbidden pairs)")
    if c.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, np.int64)  # p[j]: row (1-based) matched to column j; column 0 is a sentinel
    way = np.zeros(m + 1, np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    order = np.argsort(rows)
    rows, cols = rows[order].astype(np.int64), cols[order].astype(np.int64)
    return (cols, rows) if transposed else (rows, cols)


def _shift_box(box: np.ndarray, kp_from: np.ndarray, kp_to: np.ndarray) -> np.ndarray:
    """``box`` moved and scaled about its centre as the keypoints moved from ``kp_from`` to ``kp_to``."""
    x, y, w, h = box
    s = float(face_size(kp_to)) / max(float(face_size(kp_from)), 1e-9)
    dx, dy = kp_to.mean(axis=0) - kp_from.mean(axis=0)
    cx, cy = x + w / 2 + dx, y + h / 2 + dy
    return np.array([cx - w * s / 2, cy - h * s / 2, w * s, h * s])


def _velocity(frames: Sequence[int], keypoints: Sequence[np.ndarray]) -> np.ndarray:
    """(68, 2) pixels per frame over the given observations (oldest first); zero for one observation."""
    if len(frames) < 2 or frames[-1] == frames[0]:
        return np.zeros((NUM_KEYPOINTS, 2))
    return (keypoints[-1] - keypoints[0]) / float(frames[-1] - frames[0])


def match_cost(
    pred_boxes: np.ndarray,
    pred_keypoints: np.ndarray,
    boxes: np.ndarray,
    keypoints: np.ndarray,
    missed: np.ndarray,
    config: TrackerConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(cost (M, N), feasible (M, N)) of M predicted tracks against N faces (see the module docstring).

    ``missed`` (M,) is the number of frames each track went unmatched before this one; it widens
    that track's distance gate, since a prediction over a gap is less certain.
    """
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    pred_kp = np.asarray(pred_keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    kp = np.asarray(keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2)
    m, n = len(pred_kp), len(kp)
    if m == 0 or n == 0:
        return np.zeros((m, n)), np.zeros((m, n), bool)
    size = np.maximum(face_size(pred_kp), 1e-9)[:, None]
    dist = np.linalg.norm(pred_kp[:, None] - kp[None], axis=-1).mean(axis=-1) / size
    overlap = iou(pred_boxes, boxes)
    gate = config.max_distance * (1.0 + config.gap_widening * np.asarray(missed, np.float64).reshape(-1, 1))
    feasible = (dist <= gate) & (overlap >= config.min_iou) & np.isfinite(dist)
    w = config.iou_weight
    cost = w * (1.0 - overlap) + (1.0 - w) * np.minimum(np.nan_to_num(dist, nan=np.inf) / gate, 1.0)
    return cost, feasible


def _match(cost: np.ndarray, feasible: np.ndarray) -> list[tuple[int, int]]:
    """Optimal pairs among the feasible ones: as many matches as possible, then the lowest cost."""
    if cost.size == 0 or not feasible.any():
        return []
    rows, cols = linear_assignment(np.where(feasible, cost, _INFEASIBLE))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if feasible[r, c]]
