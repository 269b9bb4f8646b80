"""Temporal smoothing of keypoint tracks: a One-Euro filter (Casiez, Roussel, Vogel, CHI 2012).

The One-Euro filter is a first-order low-pass whose cutoff rises with speed: a still face gets
a low cutoff (jitter removed), a moving face a high one (little lag). Two choices adapt it to
faces:

* **Face-size units.** Speeds are measured in face sizes per second (the side of the Haar-like
  box :func:`~fkp_core.transforms.box_from_keypoints` derives from the keypoints; one
  inter-ocular distance is about 0.58 face sizes on a frontal face), so the same ``beta`` works
  for a 40-pixel face and a 400-pixel one. Cutoffs are in Hz and need no scaling.
* **A head-motion speed.** With ``speed="similarity"`` (the default) the speed that opens the
  filter is the motion of a least-squares similarity transform (shift, rotation, scale) fitted
  over all 68 points between the previous output and the new input: per-point noise averages out
  over the points, so noise barely opens the filter while real head motion opens it fully. The
  part of the motion a similarity cannot explain (expressions, out-of-plane rotation) adds its
  own speed through ``beta_local``. ``speed="point"`` is the classic per-point filter.

Time steps may vary (the filter uses real timestamps in seconds); a track unseen for more than
``max_gap_s`` seconds starts over from its next raw input rather than smoothing across the gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.tracking import align_similarity, face_size

# Defaults, chosen on generated 30 fps tracks (tests/test_smoothing.py): on a still face with
# Gaussian noise of 1 / 1.5 / 2 % of the inter-ocular distance the mean frame-to-frame jitter
# drops by 69 / 63 / 57 %; on a face translating 1-3 % of its size per frame while rolling and
# scaling the mean error to the truth drops by ~9 %; a mouth opening 3 times a second stays
# closer to the truth than the raw input (-7 %). A larger min_cutoff or beta follows faster and
# smooths less.
DEFAULT_MIN_CUTOFF_HZ = 1.0
DEFAULT_BETA = 40.0  # Hz per (face size / s) of head (similarity) motion
DEFAULT_BETA_LOCAL = 10.0  # Hz per (face size / s) of a point's own (non-similarity) motion
DEFAULT_D_CUTOFF_HZ = 4.0  # low-pass on the speed estimate
DEFAULT_MAX_GAP_S = 0.25  # a longer gap restarts the filter (7 missed frames at 30 fps)
MIN_FACE_SIZE_PX = 1.0  # keeps degenerate (collapsed) faces from dividing by zero
SETTLE_TOLERANCE = 1e-4  # OneEuroConfig.settle_seconds: what is left of a different start, as a fraction


@dataclass(frozen=True)
class OneEuroConfig:
    """One-Euro settings in face-size units (see the module docstring).

    cutoff = min_cutoff + beta * head speed + beta_local * the point's own speed, speeds in face
    sizes per second, smoothed with a ``d_cutoff`` low-pass.
    """

    min_cutoff: float = DEFAULT_MIN_CUTOFF_HZ
    beta: float = DEFAULT_BETA
    beta_local: float = DEFAULT_BETA_LOCAL
    d_cutoff: float = DEFAULT_D_CUTOFF_HZ
    max_gap_s: float = DEFAULT_MAX_GAP_S
    speed: Literal["similarity", "point"] = "similarity"

    def settle_seconds(self, frame_interval: float, tolerance: float = SETTLE_TOLERANCE) -> float:
        """Seconds after which the filter's output no longer depends on where it started (to ``tolerance``).

        The state's memory shrinks by 1 / (1 + 2 pi f dt) per step, f >= min_cutoff (the cutoff only
        rises with speed) and the speed low-pass (d_cutoff >= min_cutoff here) forgets faster still.
        """
        dt = max(float(frame_interval), 1e-6)
        steps = math.log(1.0 / tolerance) / math.log1p(2.0 * math.pi * min(self.min_cutoff, self.d_cutoff) * dt)
        return math.ceil(steps) * dt

    def __post_init__(self) -> None:
        if not (self.min_cutoff > 0 and self.d_cutoff > 0):
            raise ValueError("min_cutoff and d_cutoff must be > 0 Hz")
        if self.beta < 0 or self.beta_local < 0:
            raise ValueError("beta and beta_local must be >= 0")
        if not self.max_gap_s > 0:
            raise ValueError("max_gap_s must be > 0")
        if self.speed not in ("similarity", "point"):
            raise ValueError(f"speed must be 'similarity' or 'point', got {self.speed!r}")


@dataclass
class _State:
    t: float
    x: np.ndarray  # (68, 2) filtered keypoints, pixels
    dx_rigid: np.ndarray  # (68, 2) filtered head-motion velocity, face sizes / s
    dx_local: np.ndarray  # (68, 2) filtered residual velocity, face sizes / s


def _alpha(dt: float, cutoff: np.ndarray | float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass with ``cutoff`` Hz over a step of ``dt`` s."""
    r = 2.0 * math.pi * np.asarray(cutoff) * dt
    return r / (r + 1.0)


def _face_size(keypoints: np.ndarray) -> float:
    return max(float(face_size(keypoints)), MIN_FACE_SIZE_PX)


def _check(keypoints: np.ndarray) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"expected ({NUM_KEYPOINTS}, 2) keypoints, got {kp.shape}")
    return kp


def _start(t: float, kp: np.ndarray) -> _State:
    zeros = np.zeros_like(kp)
    return _State(t, kp.copy(), zeros, zeros.copy())


def _step(state: _State, t: float, kp: np.ndarray, cfg: OneEuroConfig) -> _State:
    """One filter step; a new state (the old one is not modified)."""
    dt = t - state.t
    size = _face_size(state.x)
    if cfg.speed == "similarity":
        rigid = align_similarity(state.x, kp)
        v_rigid = (rigid - state.x) / (dt * size)
        v_local = (kp - rigid) / (dt * size)
    else:
        v_rigid = np.zeros_like(kp)
        v_local = (kp - state.x) / (dt * size)
    a_d = _alpha(dt, cfg.d_cutoff)
    dx_rigid = a_d * v_rigid + (1 - a_d) * state.dx_rigid
    dx_local = a_d * v_local + (1 - a_d) * state.dx_local
    speed_rigid = np.linalg.norm(dx_rigid, axis=-1)
    speed_local = np.linalg.norm(dx_local, axis=-1)
    if cfg.speed == "point":  # classic One-Euro: beta applies to the point's own speed
        cutoff = cfg.min_cutoff + cfg.beta * speed_local
    else:
        cutoff = cfg.min_cutoff + cfg.beta * speed_rigid + cfg.beta_local * speed_local
    a = _alpha(dt, cutoff)[:, None]
    return _State(t, a * kp + (1 - a) * state.x, dx_rigid, dx_local)


def _advance(state: _State | None, t: float, kp: np.ndarray, cfg: OneEuroConfig) -> _State | None:
    """The next state: a fresh start on the first input or after a gap, None for a non-finite input."""
    if not np.isfinite(kp).all():
        return None
    if state is None or t - state.t > cfg.max_gap_s:
        return _start(t, kp)
    return _step(state, t, kp, cfg)


def smooth_track(times: np.ndarray, keypoints: np.ndarray, config: OneEuroConfig | None = None) -> np.ndarray:
    """Smooth one whole track offline: times (T,) seconds increasing, keypoints (T, 68, 2) -> (T, 68, 2) float32.

    A causal filter, as if the track were smoothed frame by frame (a gap longer than ``max_gap_s`` restarts it).
    """
    cfg = config or OneEuroConfig()
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.shape != (len(times), NUM_KEYPOINTS, 2):
        raise ValueError(f"expected keypoints ({len(times)}, {NUM_KEYPOINTS}, 2), got {kps.shape}")
    if len(times) > 1 and not np.all(np.diff(times) > 0):
        raise ValueError("times must be strictly increasing")
    out = np.empty(kps.shape, dtype=np.float32)
    state: _State | None = None
    for i, (t, kp) in enumerate(zip(times, kps)):
        state = _advance(state, float(t), kp, cfg)
        out[i] = kp if state is None else state.x
    return out
