"""The shifted view: each face's last crop predicted again with its content moved half a heatmap cell, averaged.

A CNN that downsamples is not shift-equivariant: where the face falls on its stride-8 heatmap grid (and on the
strided layers before it) moves each predicted point by a little of its own. Moving the crop's content by half a
cell (:data:`~fkp_core.constants.SHIFTED_VIEW_PIXELS`) and mapping the points back gives a second look whose
grid-borne error is largely independent of the first, so the mean of the two has less error, on top of what the
mirrored pass (:mod:`fkp_core.mirror`) averages away. It costs one more CNN pass per view it shifts (two with the
mirrored pass), so it is off by default: the job's ``--shifted-view``.

Content moved ``p`` pixels right and down equals a crop ``p`` crop pixels up and left of the first, except in a
``p``-pixel strip at the top and left edges, repeated here from the edge where the image would show more margin.
"""

from __future__ import annotations

import numpy as np

from fkp_core.mirror import PredictFn


def shift_crops(crops: np.ndarray, pixels: int) -> np.ndarray:
    """(N, S, S) crops with their content moved ``pixels`` right and down, the top and left edges repeated."""
    arr = np.asarray(crops)
    size = arr.shape[-1]
    pad = ((0, 0), (pixels, 0), (pixels, 0))
    return np.ascontiguousarray(np.pad(arr, pad, mode="edge")[:, :size, :size])


def with_shifted_view(predict: PredictFn, pixels: int) -> PredictFn:
    """``predict`` on each crop and on the crop shifted by ``pixels`` (points mapped back), in one call, the points
    averaged and the scores those of the unshifted crop (what the face confidence was fitted on)."""
    if pixels < 1:
        raise ValueError(f"the shifted view moves the crop by at least one pixel, got {pixels}")

    def predict_with_shifted(crops: np.ndarray) -> np.ndarray:
        arr = np.asarray(crops)
        n = len(arr)
        if n == 0:
            return np.asarray(predict(arr))
        both = np.asarray(predict(np.concatenate([arr, shift_crops(arr, pixels)])))
        out = np.array(both[:n], dtype=np.float32, copy=True)
        back = both[n:, :, :2] - 2.0 * pixels / arr.shape[-1]  # crop pixels -> crop units of [-1, 1]
        out[..., :2] = (out[..., :2] + back) / 2.0
        return out

    return predict_with_shifted
