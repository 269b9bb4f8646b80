"""Faces linked across frames into tracks: per-segment tracking, scene cuts, and stitching segments.

The video job cuts a video into segments of consecutive frames that run in parallel. Inside a
segment, a :class:`Tracker` gives each face a *local* track id, frame by frame. On the driver,
:func:`stitch_segments` links the tracks that cross a segment boundary (with the tracker's own
matching rule, so a face keeps one id across boundaries, gaps and short segments included) and
gives every track a *global* id, dense (0..T-1) and ordered by first appearance.

Matching cost, the same inside a segment and across boundaries: a track's keypoints are
predicted at the new frame with a constant velocity (estimated over its last few observations),
then for each (track, face) pair

    cost = iou_weight * (1 - IoU(predicted box, face box))
         + (1 - iou_weight) * mean keypoint distance / face size / max_distance

where the face size is the side of the Haar-like box :func:`~fkp_core.transforms.box_from_keypoints`
puts around the predicted keypoints. Pairs further apart than ``max_distance`` face sizes (the
gate widens by ``gap_widening`` per missed frame) or with an IoU under ``min_iou`` never match;
the rest are matched optimally (a small Hungarian solver: N is a handful of faces).

The fast path (track without detecting): the job crops the next frame around
:func:`crop_box_from_keypoints` of a track's (predicted) keypoints, predicts keypoints there and
calls :func:`keypoint_consistency`; a score under :data:`~ConsistencyConfig.redetect_below` means
the fit is lost and the detector should run again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from fkp_core.constants import LEFT_EYE_OUTER, NUM_KEYPOINTS, RIGHT_EYE_OUTER
from fkp_core.detector import iou
from fkp_core.transforms import CROP_MARGIN, box_from_keypoints, face_frame, to_gray

# The fast path crops where the training crops were made: around the keypoints' Haar-like box.
crop_box_from_keypoints = box_from_keypoints

# ---- matching defaults (face-size units: 1.0 = the side of the face's Haar-like box) ----
DEFAULT_MAX_DISTANCE = 0.5  # mean keypoint distance (after prediction) beyond which a pair never matches
DEFAULT_MIN_IOU = 0.05  # box IoU (after prediction) under which a pair never matches
DEFAULT_IOU_WEIGHT = 0.5  # share of (1 - IoU) in the cost; the rest is the keypoint distance
DEFAULT_MAX_GAP = 10  # frames a track may go unmatched and still continue (1/3 s at 30 fps)
DEFAULT_GAP_WIDENING = 0.1  # the distance gate grows by this fraction per missed frame
VELOCITY_WINDOW = 3  # velocity = displacement over (up to) the last 3 frame steps / their frames
_INFEASIBLE = 1e6  # cost of a gated-out pair inside the assignment solver

# ---- scene cuts ----
# A frame's signature: the block histograms and the layout of a small gray thumbnail.
SIGNATURE_SIZE = 64  # frames are compared as 64 x 64 gray thumbnails ...
SIGNATURE_GRID = 2  # ... whose 2 x 2 blocks each give a 16-bin histogram (the tones) ...
SIGNATURE_BINS = 16
LAYOUT_SIZE = 16  # ... and whose 16 x 16 reduction, normalised to zero mean and unit norm, is the layout.
# A cut needs both to change. Tones: mean Hellinger distance of the block histograms (0 same, 1
# disjoint); consecutive frames of a shot (motion, noise) score < 0.12 on generated scenes,
# different scenes 0.23-0.75. Layout: 1 - normalised correlation of the 16 x 16 thumbnails (0 same,
# ~1 unrelated); a pan of 6 % of the frame width scores 0.1-0.2, a brightness change 0, different
# scenes 0.55-1.2. A flash thus changes tones but not layout, a fast pan layout but not tones.
CUT_TONE_DISTANCE = 0.2
CUT_LAYOUT_DISTANCE = 0.4
SCENE_CUT_THRESHOLD = 1.0  # on cut_score: min(tone / CUT_TONE_DISTANCE, layout / CUT_LAYOUT_DISTANCE)

# ---- fit consistency (the fast path's "re-detect now" test) ----
REDETECT_BELOW = 0.5


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


# --------------------------------------------------------------------------------------------
# Geometry and assignment
# --------------------------------------------------------------------------------------------


def face_size(keypoints: np.ndarray) -> np.ndarray:
    """Side of the Haar-like box of (..., 68, 2) keypoints, (...): the unit of every tracking distance."""
    return box_from_keypoints(keypoints)[..., 2]


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


# --------------------------------------------------------------------------------------------
# The per-segment tracker
# --------------------------------------------------------------------------------------------


@dataclass
class _Track:
    track_id: int
    box: np.ndarray  # (4,) last matched box
    frames: deque  # last observation frames, oldest first
    keypoints: deque  # last observed (68, 2) keypoints, float64

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    def predict(self, frame_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(box, keypoints) expected at ``frame_index`` under constant velocity."""
        last = self.keypoints[-1]
        kp = last + _velocity(self.frames, self.keypoints) * (frame_index - self.last_frame)
        return _shift_box(self.box, last, kp), kp


class Tracker:
    """Give each face of each frame a track id (int64, allocated 0, 1, 2, ... in order of creation).

    Feed frames in increasing order. A track unmatched for more than ``max_gap`` frames ends; a
    face that matches no live track starts a new one. Call :meth:`reset` on a scene cut: every
    track ends and the faces after the cut get new ids (ids are never reused).
    """

    def __init__(self, config: TrackerConfig | None = None, first_id: int = 0):
        self.config = config or TrackerConfig()
        self._next_id = int(first_id)
        self._tracks: list[_Track] = []
        self._last_frame: int | None = None

    def _live(self, frame_index: int) -> list[_Track]:
        return [t for t in self._tracks if frame_index - t.last_frame - 1 <= self.config.max_gap]

    def update(
        self, frame_index: int, boxes: np.ndarray, keypoints: np.ndarray, continues: np.ndarray | None = None
    ) -> np.ndarray:
        """Track ids (N,) int64 of the N faces (boxes (N, 4) xywh, keypoints (N, 68, 2)) of frame ``frame_index``.

        ``continues`` (N,) optionally names the track each face is known to continue (-1: unknown),
        as the video fast path knows for a face it followed from its own previous keypoints: such a
        face keeps that id while the track is live, and only the others are matched.
        """
        frame_index = int(frame_index)
        if self._last_frame is not None and frame_index <= self._last_frame:
            raise ValueError(f"frames must increase: got {frame_index} after {self._last_frame}")
        self._last_frame = frame_index
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        kp = np.asarray(keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2)
        if len(boxes) != len(kp):
            raise ValueError(f"{len(boxes)} boxes but {len(kp)} keypoint sets")
        self._tracks = self._live(frame_index)
        ids = np.full(len(kp), -1, np.int64)
        free = list(self._tracks)
        if continues is not None:
            continues = np.asarray(continues, np.int64).reshape(-1)
            if len(continues) != len(kp):
                raise ValueError(f"{len(kp)} faces but {len(continues)} continued track ids")
            by_id = {t.track_id: t for t in self._tracks}
            for di, tid in enumerate(continues.tolist()):
                track = by_id.pop(tid, None)  # each live track continues into one face at most
                if track is not None:
                    self._extend(track, frame_index, boxes[di], kp[di])
                    ids[di] = tid
            free = [t for t in self._tracks if t.track_id in by_id]
        todo = np.flatnonzero(ids < 0)
        if free and len(todo):
            preds = [t.predict(frame_index) for t in free]
            missed = np.array([frame_index - t.last_frame - 1 for t in free])
            cost, feasible = match_cost(
                np.stack([b for b, _ in preds]), np.stack([k for _, k in preds]), boxes[todo], kp[todo], missed, self.config
            )
            for ti, dj in _match(cost, feasible):
                di = todo[dj]
                self._extend(free[ti], frame_index, boxes[di], kp[di])
                ids[di] = free[ti].track_id
        window = self.config.velocity_window + 1
        for di in np.nonzero(ids < 0)[0]:
            frames, points = deque([frame_index], maxlen=window), deque([kp[di].copy()], maxlen=window)
            track = _Track(self._next_id, boxes[di].copy(), frames, points)
            self._next_id += 1
            self._tracks.append(track)
            ids[di] = track.track_id
        return ids

    @staticmethod
    def _extend(track: _Track, frame_index: int, box: np.ndarray, keypoints: np.ndarray) -> None:
        track.box = box.copy()
        track.frames.append(frame_index)
        track.keypoints.append(keypoints.copy())

    def reset(self) -> None:
        """End every track (call on a scene cut); later faces get new ids."""
        self._tracks = []

    @property
    def next_id(self) -> int:
        """The id the next new track will get (= the number of ids allocated when ``first_id`` is 0)."""
        return self._next_id


# --------------------------------------------------------------------------------------------
# Scene cuts
# --------------------------------------------------------------------------------------------


def frame_signature(image: np.ndarray) -> np.ndarray:
    """A small summary of a frame for cut detection: a float32 vector (block histograms, then layout).

    Gray, BGR or BGRA input of any size (float images in [0, 1] or [0, 255]). A segment task keeps
    the signature of its previous frame (cheaper than keeping the frame) and returns those of its
    first and last frames for :func:`stitch_segments`.
    """
    gray = to_gray(np.asarray(image))
    if gray.dtype != np.uint8:
        g = gray.astype(np.float64)
        gray = np.clip(g * (255.0 if g.size and g.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    # Sample a 2x grid of pixels (nearest) and average each 2 x 2 of it: the thumbnail reads 4 pixels
    # per thumbnail pixel, not the whole frame, which is enough to be insensitive to noise. Both
    # resizes take OpenCV's fast paths (an area resize by a fraction does not): ~15 us on 640x480,
    # run on every frame of every video.
    side = 2 * SIGNATURE_SIZE
    if min(gray.shape[0], gray.shape[1]) >= side:
        gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_NEAREST)
    thumb = cv2.resize(gray, (SIGNATURE_SIZE, SIGNATURE_SIZE), interpolation=cv2.INTER_AREA)
    step = SIGNATURE_SIZE // SIGNATURE_GRID
    blocks = thumb.reshape(SIGNATURE_GRID, step, SIGNATURE_GRID, step).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(SIGNATURE_GRID**2, -1)
    # one bincount over (block, bin) pairs
    bins = (blocks.astype(np.int64) * SIGNATURE_BINS) // 256 + (np.arange(SIGNATURE_GRID**2) * SIGNATURE_BINS)[:, None]
    hist = np.bincount(bins.ravel(), minlength=SIGNATURE_GRID**2 * SIGNATURE_BINS).astype(np.float64)
    hist = hist.reshape(SIGNATURE_GRID**2, SIGNATURE_BINS)
    hist /= hist.sum(axis=1, keepdims=True)
    layout = cv2.resize(thumb, (LAYOUT_SIZE, LAYOUT_SIZE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    layout -= layout.mean()
    norm = np.linalg.norm(layout)
    layout = layout / norm if norm > 0 else layout
    return np.concatenate([hist.ravel(), layout]).astype(np.float32)


_HIST_LEN = SIGNATURE_GRID**2 * SIGNATURE_BINS
SIGNATURE_LENGTH = _HIST_LEN + LAYOUT_SIZE**2


def cut_score(a: np.ndarray, b: np.ndarray) -> float:
    """How strongly two frame signatures look like a cut: > :data:`SCENE_CUT_THRESHOLD` (1.0) is a cut.

    min(tone distance / CUT_TONE_DISTANCE, layout distance / CUT_LAYOUT_DISTANCE): both must change.
    A blank (flat) frame has no layout; its layout distance to anything is then 1 (unrelated).
    """
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.shape != (SIGNATURE_LENGTH,) or b.shape != (SIGNATURE_LENGTH,):
        raise ValueError(f"signatures must have {SIGNATURE_LENGTH} values, got {a.shape} and {b.shape}")
    ha = a[:_HIST_LEN].reshape(-1, SIGNATURE_BINS)
    hb = b[:_HIST_LEN].reshape(-1, SIGNATURE_BINS)
    tone = float(np.sqrt(np.clip(1.0 - np.sqrt(ha * hb).sum(axis=-1), 0.0, 1.0)).mean())
    layout = 1.0 - float(a[_HIST_LEN:] @ b[_HIST_LEN:])
    return min(tone / CUT_TONE_DISTANCE, layout / CUT_LAYOUT_DISTANCE)


# --------------------------------------------------------------------------------------------
# Fit consistency: is the fast path's keypoint fit still on the face?
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Stitching segments on the driver
# --------------------------------------------------------------------------------------------


def _empty_int() -> np.ndarray:
    return np.zeros(0, np.int64)


def _empty_float() -> np.ndarray:
    return np.zeros(0, np.float32)


@dataclass(frozen=True)
class SegmentTracks:
    """What one segment task hands the driver for stitching: its tracker output as numpy arrays.

    * ``start``, ``end``: the segment's frames, [start, end).
    * ``frame_index`` (R,) int64, ``track_id`` (R,) int64 (the local ids of its :class:`Tracker`),
      ``boxes`` (R, 4), ``keypoints`` (R, 68, 2): one row per face per frame, all the segment's
      rows (global ids are ordered by every track's first frame), in any fixed order (row order
      only breaks ties between tracks that first appear in the same frame).
    * ``cuts`` (C,) int64: frames f that start a new shot (the task called ``Tracker.reset()``
      before frame f). A task that also decoded frame ``start - 1`` and found a cut there puts
      ``start`` in it.
    * ``head_signature`` / ``tail_signature``: :func:`frame_signature` of frames ``start`` and
      ``end - 1`` (empty when unknown): the driver compares segment k's tail with segment k+1's
      head to find a cut exactly at the boundary, which neither task can see alone.
    """

    start: int
    end: int
    frame_index: np.ndarray = field(default_factory=_empty_int)
    track_id: np.ndarray = field(default_factory=_empty_int)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, NUM_KEYPOINTS, 2), np.float32))
    cuts: np.ndarray = field(default_factory=_empty_int)
    head_signature: np.ndarray = field(default_factory=_empty_float)
    tail_signature: np.ndarray = field(default_factory=_empty_float)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "frame_index", np.asarray(self.frame_index, np.int64).reshape(-1))
        set_(self, "track_id", np.asarray(self.track_id, np.int64).reshape(-1))
        set_(self, "boxes", np.asarray(self.boxes, np.float64).reshape(-1, 4))
        set_(self, "keypoints", np.asarray(self.keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2))
        set_(self, "cuts", np.asarray(self.cuts, np.int64).reshape(-1))
        set_(self, "head_signature", np.asarray(self.head_signature, np.float32))
        set_(self, "tail_signature", np.asarray(self.tail_signature, np.float32))
        r = len(self.frame_index)
        if not (len(self.track_id) == len(self.boxes) == len(self.keypoints) == r):
            raise ValueError("frame_index, track_id, boxes and keypoints must have the same number of rows")
        if self.end < self.start:
            raise ValueError(f"segment end {self.end} is before its start {self.start}")
        if r and (self.frame_index.min() < self.start or self.frame_index.max() >= self.end):
            raise ValueError(f"rows outside the segment's frames [{self.start}, {self.end})")


@dataclass
class _TrackSummary:
    segment: int  # position in start order
    local_id: int
    first_row: int
    first_frame: int
    first_box: np.ndarray
    first_keypoints: np.ndarray
    last_frame: int
    last_box: np.ndarray
    last_keypoints: np.ndarray
    velocity: np.ndarray  # (68, 2) per frame, over the track's last observations


def _summaries(seg: SegmentTracks, position: int, window: int) -> list[_TrackSummary]:
    out = []
    for local in dict.fromkeys(seg.track_id.tolist()):  # in order of first row
        rows = np.nonzero(seg.track_id == local)[0]
        rows = rows[np.argsort(seg.frame_index[rows], kind="stable")]
        first, last = rows[0], rows[-1]
        tail = rows[-(window + 1) :]
        out.append(
            _TrackSummary(
                position,
                int(local),
                int(first),
                int(seg.frame_index[first]),
                seg.boxes[first],
                seg.keypoints[first],
                int(seg.frame_index[last]),
                seg.boxes[last],
                seg.keypoints[last],
                _velocity(seg.frame_index[tail].tolist(), list(seg.keypoints[tail])),
            )
        )
    return out


def stitch_segments(
    segments: Sequence[SegmentTracks],
    config: TrackerConfig | None = None,
    cut_threshold: float = SCENE_CUT_THRESHOLD,
) -> list[dict[int, int]]:
    """Global track ids for every segment's local ids: one {local id: global id} dict per segment, in input order.

    A track ending in an earlier segment continues as a track starting in a later one when the
    frames between them are at most ``max_gap``, no scene cut lies between them (a cut in either
    segment's ``cuts``, or at the boundary by their signatures), and the two match under the
    tracker's cost (constant-velocity prediction of the earlier track to the later one's first
    frame, one-to-one, optimal). This is the rule the :class:`Tracker` applies inside a segment,
    so a track crossing a boundary keeps one id. Global ids are 0..T-1 by first appearance (first
    frame, then the segment's row order). Segments must not overlap; input order is free.
    """
    cfg = config or TrackerConfig()
    order = sorted(range(len(segments)), key=lambda i: (segments[i].start, segments[i].end))
    segs = [segments[i] for i in order]
    for a, b in zip(segs, segs[1:]):
        if b.start < a.end:
            raise ValueError(f"segments overlap: [{a.start}, {a.end}) and [{b.start}, {b.end})")
    cuts: set[int] = set()
    for s in segs:
        cuts.update(int(c) for c in s.cuts)
    for a, b in zip(segs, segs[1:]):
        if a.tail_signature.size and b.head_signature.size:
            if cut_score(a.tail_signature, b.head_signature) > cut_threshold:
                cuts.add(b.start)
    cut_list = np.array(sorted(cuts), np.int64)

    def cut_between(last: int, first: int) -> bool:
        i = np.searchsorted(cut_list, last, side="right")  # first cut > last
        return bool(i < len(cut_list) and cut_list[i] <= first)

    summaries = [_summaries(s, k, cfg.velocity_window) for k, s in enumerate(segs)]
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(node: tuple[int, int]) -> tuple[int, int]:
        while parent.get(node, node) != node:
            node = parent[node]
        return node

    open_tails: list[_TrackSummary] = []  # track ends not yet continued, oldest segment first
    for k, heads_all in enumerate(summaries):
        start = segs[k].start
        open_tails = [t for t in open_tails if start - t.last_frame - 1 <= cfg.max_gap]
        heads = [h for h in heads_all if h.first_frame - start <= cfg.max_gap]
        if open_tails and heads:
            preds = []
            for t in open_tails:
                for h in heads:
                    kp = t.last_keypoints + t.velocity * (h.first_frame - t.last_frame)
                    preds.append((_shift_box(t.last_box, t.last_keypoints, kp), kp))
            cost = np.zeros((len(open_tails), len(heads)))
            feasible = np.zeros_like(cost, bool)
            for ti, t in enumerate(open_tails):
                for hi, h in enumerate(heads):
                    missed = h.first_frame - t.last_frame - 1
                    if missed > cfg.max_gap or cut_between(t.last_frame, h.first_frame):
                        continue
                    box, kp = preds[ti * len(heads) + hi]
                    c, f = match_cost(
                        box[None], kp[None], h.first_box[None], h.first_keypoints[None], np.array([missed]), cfg
                    )
                    cost[ti, hi], feasible[ti, hi] = c[0, 0], f[0, 0]
            linked = set()
            for ti, hi in _match(cost, feasible):
                t, h = open_tails[ti], heads[hi]
                parent[(h.segment, h.local_id)] = root((t.segment, t.local_id))
                linked.add(ti)
            open_tails = [t for i, t in enumerate(open_tails) if i not in linked]
        open_tails += heads_all

    first_seen: dict[tuple[int, int], tuple[int, int, int]] = {}
    for seg_summaries in summaries:
        for s in seg_summaries:
            r = root((s.segment, s.local_id))
            key = (s.first_frame, s.segment, s.first_row)
            if r not in first_seen or key < first_seen[r]:
                first_seen[r] = key
    global_of_root = {r: g for g, r in enumerate(sorted(first_seen, key=first_seen.__getitem__))}
    by_position = [{s.local_id: global_of_root[root((s.segment, s.local_id))] for s in seg} for seg in summaries]
    result: list[dict[int, int]] = [{} for _ in segments]
    for position, original in enumerate(order):
        result[original] = by_position[position]
    return result


def global_track_ids(segment: SegmentTracks, mapping: dict[int, int]) -> np.ndarray:
    """The segment's rows relabelled with global ids, (R,) int64 (``mapping`` from :func:`stitch_segments`)."""
    return np.array([mapping[int(t)] for t in segment.track_id], np.int64)
