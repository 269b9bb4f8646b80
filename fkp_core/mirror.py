"""The mirrored pass: a face crop and its mirror image, predicted by the same network, averaged.

A keypoint network is not mirror-symmetric: its training labels sit a little to one side of what they
mark (about a pixel in both training sets, :data:`~fkp_core.constants.LABEL_X_OFFSET`), so it learns to
place every point ``offset`` crop units to the right of the feature. On a mirrored crop it places them
to the right of the mirrored feature, which is to the left once mapped back; a model's offset is measured
from its own predictions on a face and its mirror image (:func:`fit_mirror_offset`, no labels needed)
and stored in its JSON (``"mirror_offset"``). With it, the mirrored crop's prediction is an independent
second look at the face, and the mean of the two has less error than either.

Where it runs (:func:`fkp_core.landmarks.refined_keypoints`): on a face's last crop (a detected face's
re-crop around its first prediction, a tracked face's crop around its last keypoints), one more CNN pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fkp_core.constants import FLIP_PERMUTATION

PredictFn = Callable[[np.ndarray], np.ndarray]  # (N, S, S) crops -> (N, 68, 2|3): x, y in [-1, 1] (and a score)

_PERM = np.asarray(FLIP_PERMUTATION)


def unmirror(predicted: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """Predictions (N, 68, C) on mirrored crops -> the same points on the original crops: x mirrored, points
    relabelled, and moved ``2 * offset`` (the model's own offset, once on each side of the mirror) to the right."""
    out = np.array(predicted, dtype=np.float32, copy=True)[:, _PERM]
    out[..., 0] = 2.0 * offset - out[..., 0]
    return out


def mirrored(predict: PredictFn, offset: float) -> PredictFn:
    """``predict`` run on the mirror image of each crop, mapped back (:func:`unmirror`)."""

    def predict_mirrored(crops: np.ndarray) -> np.ndarray:
        return unmirror(np.asarray(predict(np.ascontiguousarray(np.asarray(crops)[:, :, ::-1]))), offset)

    return predict_mirrored


def averaged(predict: PredictFn, offset: float) -> PredictFn:
    """``predict`` on each crop and on its mirror image mapped back (:func:`mirrored`), the points averaged and the
    scores the mirror image's: the mirrored pass over one set of crops, cut once."""
    predict_back = mirrored(predict, offset)

    def predict_averaged(crops: np.ndarray) -> np.ndarray:
        plain = np.asarray(predict(crops))
        out = predict_back(crops)
        out[..., :2] = (plain[..., :2] + out[..., :2]) / 2.0
        return out

    return predict_averaged


def both_views(predict: PredictFn, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predictions on each crop and on its mirror image mapped back without an offset: what the fits compare."""
    crops = np.asarray(crops)
    return np.asarray(predict(crops)), mirrored(predict, 0.0)(crops)


def offset_between(plain: np.ndarray, back: np.ndarray) -> float:
    """The model's horizontal offset in crop units ([-1, 1] spans the crop): half the mean gap between its points on
    each crop and on the crop's mirror image mapped back (:func:`both_views`)."""
    return float(np.mean(plain[..., 0] - back[..., 0]) / 2.0)


def fit_mirror_offset(predict: PredictFn, crops: np.ndarray) -> float:
    """The model's offset from its own predictions on faces (training faces) and their mirror images."""
    return offset_between(*both_views(predict, crops))
