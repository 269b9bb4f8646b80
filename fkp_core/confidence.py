"""Scores that say how far to trust a keypoint, and a face.

Per keypoint: each point gets an expected error (crop units), and the score maps it to 0..1
(:func:`log_sd_keypoint_scores`) with two ends measured on labelled training faces: 1 at the
sharpest 5% of training points, 0 at the median over non-face crops. Where the expected error comes
from depends on the model (:class:`~fkp_core.model.HeatmapHead`):

- a learned error head (``point_sigma``, the default model): a 1x1 convolution on the decoder's
  features, read under the point's heatmap and trained to the points' detached errors, with crops
  moved off the face counted as lost points (``jobs.train --point-sigma --nonface``). Networks trained
  from ImageNet with occluders learn to place hidden points with sharp heatmaps, so their spread says
  nothing about their error; this head is trained to say it.
- otherwise the spread of the point's heatmap (the soft-argmax's softmax): where the network sees the
  point the mass is concentrated, where it does not (an occluded mouth, no face) it spreads out. No
  weights of its own, so every heatmap model file gives scores.

Per face (:func:`face_confidence`): a logistic combination of the detector's score and the mean
keypoint score (the fit), fitted on training images (detections matched to an annotated face
against the rest: ``python -m jobs.evaluate --fit-confidence``) for each model, whose scores have their
own scale (:class:`FaceConfidenceWeights`, in the model's JSON), times the fit's consistency
with its crop (:func:`~fkp_core.tracking.keypoint_consistency`). On tracked frames, where the
detector did not run, the track carries its last detection's score, so a face is only as
trusted as the detection that started it, while the fresh fit and consistency pull the score
down as soon as the crop slides off the face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fkp_core.constants import (
    FACE_CONF_BIAS,
    FACE_CONF_DETECTOR,
    FACE_CONF_FIT,
    FACE_CONF_FIT_ONLY,
    FACE_CONF_FIT_ONLY_BIAS,
    FACE_DETECTOR_SCORE_CLIP,
    FACE_FIT_UNKNOWN,
    KEYPOINT_SPREAD_FLAT,
    KEYPOINT_SPREAD_SHARP,
)


@dataclass(frozen=True)
class FaceConfidenceWeights:
    """The face confidence's logistic weights for one model: with a detector score (``bias``, ``detector``,
    ``fit``) and for detectors without one (``fit_only_bias``, ``fit_only``). The mean keypoint score is on
    each model's own scale, so a model's JSON carries the weights fitted with it (``"face_confidence"``); the
    defaults are those fitted with the bundled default model."""

    bias: float = FACE_CONF_BIAS
    detector: float = FACE_CONF_DETECTOR
    fit: float = FACE_CONF_FIT
    fit_only_bias: float = FACE_CONF_FIT_ONLY_BIAS
    fit_only: float = FACE_CONF_FIT_ONLY

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> FaceConfidenceWeights:
        """The weights in a model's JSON metadata, or the defaults where it has none."""
        fitted = metadata.get("face_confidence")
        if not isinstance(fitted, dict):
            return cls()
        return cls(**{k: float(fitted[k]) for k in cls.__dataclass_fields__ if k in fitted})


DEFAULT_FACE_WEIGHTS = FaceConfidenceWeights()


def heatmap_keypoint_scores(variance, sharp: float = KEYPOINT_SPREAD_SHARP, flat: float = KEYPOINT_SPREAD_FLAT):
    """Scores in 0..1 from the heatmap variance (x plus y, crop units) of each point; torch or numpy."""
    log_sd = 0.5 * (variance.clamp_min(1e-12).log() if hasattr(variance, "clamp_min") else np.log(np.maximum(variance, 1e-12)))
    return log_sd_keypoint_scores(log_sd, sharp, flat)


def log_sd_keypoint_scores(log_sd, sharp: float = KEYPOINT_SPREAD_SHARP, flat: float = KEYPOINT_SPREAD_FLAT):
    """Scores in 0..1 from the log of each point's expected error (crop units: its heatmap's spread, or what a
    learned error head predicts); torch or numpy.

    Linear in log spread between ``sharp`` (1) and ``flat`` (0): a ratio of spreads means the same
    change of score at any sharpness. Written with plain arithmetic so that it exports to ONNX.
    """
    score = (math.log(flat) - log_sd) / (math.log(flat) - math.log(sharp))
    return score.clamp(0.0, 1.0) if hasattr(score, "clamp") else np.clip(score, 0.0, 1.0)


def fit_score(keypoint_scores: np.ndarray) -> np.ndarray:
    """(N, 68) keypoint scores -> (N,) mean: how face-like the whole fit is (``FACE_FIT_UNKNOWN`` where NaN)."""
    k = np.asarray(keypoint_scores, np.float64)
    if k.size == 0:
        return np.zeros(len(k))
    mean = k.reshape(len(k), -1).mean(axis=1)
    return np.where(np.isfinite(mean), mean, FACE_FIT_UNKNOWN)


def _logit(p: np.ndarray) -> np.ndarray:
    lo, hi = FACE_DETECTOR_SCORE_CLIP
    p = np.clip(np.asarray(p, np.float64), lo, hi)
    return np.log(p / (1.0 - p))


def face_logit(detector_scores: np.ndarray, keypoint_scores: np.ndarray,
               weights: FaceConfidenceWeights = DEFAULT_FACE_WEIGHTS) -> np.ndarray:
    """The logistic model's log-odds that each face is a real face, before the consistency factor.

    A NaN detector score (a detector without meaningful scores, such as the Haar cascades, whose
    scores are all 1) uses the model fitted on the mean keypoint score alone.
    """
    det = np.asarray(detector_scores, np.float64).reshape(-1)
    fit = fit_score(keypoint_scores)
    with_det = weights.bias + weights.detector * _logit(np.nan_to_num(det, nan=0.5)) + weights.fit * fit
    return np.where(np.isnan(det), weights.fit_only_bias + weights.fit_only * fit, with_det)


def face_confidence(detector_scores: np.ndarray, keypoint_scores: np.ndarray, consistency: np.ndarray | None = None,
                    weights: FaceConfidenceWeights = DEFAULT_FACE_WEIGHTS) -> np.ndarray:
    """(N,) face confidence in 0..1 from the detector's score (the track's last one on tracked frames; NaN:
    the detector has none), (N, 68) keypoint scores and the (N,) consistency of the fit (None: 1)."""
    z = face_logit(detector_scores, keypoint_scores, weights)
    p = 1.0 / (1.0 + np.exp(-z))
    if consistency is not None:
        p = p * np.clip(np.asarray(consistency, np.float64), 0.0, 1.0)
    return p.astype(np.float32).reshape(-1)
