"""Landmark accuracy as the literature reports it: NME over the inter-ocular distance, FR, CED, AUC."""

from __future__ import annotations

import numpy as np

from fkp_core.constants import LEFT_EYE_OUTER, REGIONS, RIGHT_EYE_OUTER

FAILURE_THRESHOLD = 0.10


def interocular(gt: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (points 36 and 45), (N,)."""
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 68, 2)
    return np.linalg.norm(gt[:, RIGHT_EYE_OUTER] - gt[:, LEFT_EYE_OUTER], axis=-1)


def nme(pred: np.ndarray, gt: np.ndarray, points: range | slice | None = None) -> np.ndarray:
    """Per-face mean point-to-point error divided by the inter-ocular distance, (N,)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 68, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 68, 2)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ")
    idx = slice(None) if points is None else points
    err = np.linalg.norm(pred[:, idx] - gt[:, idx], axis=-1).mean(axis=-1)
    d = interocular(gt)
    if np.any(d <= 0):
        raise ValueError("inter-ocular distance is zero for some face")
    return err / d


def region_nme(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Mean NME of each facial region (jaw, brows, nose, eyes, mouth)."""
    return {name: float(nme(pred, gt, list(r)).mean()) for name, r in REGIONS.items()}


def jaw_along_across(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The jaw's error split into its components along and across the annotated jaw line (mean absolute component
    over the inter-ocular distance; the line's direction at each point from its labelled neighbours).

    Jaw points are defined by the face's outline and only loosely by where along it: an error across the line is a
    misplaced outline, one along it mostly the labels' own spread, which eyes and mouth corners do not have.
    """
    jaw = list(REGIONS["jaw"])
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 68, 2)[:, jaw]
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 68, 2)
    line = gt[:, jaw]
    tangent = np.gradient(line, axis=1)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=-1, keepdims=True), 1e-12)
    err = pred - line
    along = np.abs((err * tangent).sum(-1))
    across = np.abs(err[..., 0] * tangent[..., 1] - err[..., 1] * tangent[..., 0])
    d = interocular(gt)[:, None]
    return {"along": float((along / d).mean()), "across": float((across / d).mean())}


def failure_rate(errors: np.ndarray, threshold: float = FAILURE_THRESHOLD) -> float:
    """Fraction of faces whose NME exceeds ``threshold``."""
    errors = np.asarray(errors, dtype=np.float64)
    return float((errors > threshold).mean()) if errors.size else float("nan")


def ced(errors: np.ndarray, threshold: float = FAILURE_THRESHOLD, steps: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: thresholds in [0, threshold] and the fraction of faces at or under each."""
    errors = np.sort(np.asarray(errors, dtype=np.float64))
    xs = np.linspace(0.0, threshold, steps)
    ys = np.searchsorted(errors, xs, side="right") / max(len(errors), 1)
    return xs, ys


def auc(errors: np.ndarray, threshold: float = FAILURE_THRESHOLD) -> float:
    """Area under the CED up to ``threshold``, divided by ``threshold`` (1.0 = every face perfect)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return float("nan")
    # exact: the integral of the step CDF equals the mean of (threshold - e)+ over all faces
    return float(np.clip(threshold - errors, 0.0, None).mean() / threshold)


def summarize(pred: np.ndarray, gt: np.ndarray, threshold: float = FAILURE_THRESHOLD) -> dict:
    """The report a table line needs: NME, per-region NME, FR and AUC at ``threshold``."""
    errors = nme(pred, gt)
    return {
        "faces": int(len(errors)),
        "nme": float(errors.mean()) if errors.size else float("nan"),
        "nme_median": float(np.median(errors)) if errors.size else float("nan"),
        f"fr@{threshold:.2f}": failure_rate(errors, threshold),
        f"auc@{threshold:.2f}": auc(errors, threshold),
        "regions": region_nme(pred, gt) if errors.size else {},
        "jaw_line": jaw_along_across(pred, gt) if errors.size else {},
    }
