"""Images -> faces with 68 keypoints in image pixels: detector, face crop, one batched CNN pass.

All face crops of one or many images go through the network together; each prediction is
mapped back through the inverse of the crop that produced it. The first crop comes from the
detector's box through that detector's calibration, turned upright by its eye points where it
has them; with ``refine`` > 0 the face is cropped again around its predicted keypoints (the
framing the model was trained on, eyes level) and predicted once more, which removes most of
the error a detector's loose box adds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS, SHIFTED_VIEW_PIXELS
from fkp_core.detector import DetectorSpec, FaceDetector, make_detector
from fkp_core.fitted import ModelFit
from fkp_core.mirror import averaged
from fkp_core.shifted_view import with_shifted_view
from fkp_core.transforms import crop_face, face_frame, to_gray, uncrop_keypoints

if TYPE_CHECKING:  # torch only where a model is loaded: the crop-and-map functions serve annotators that run ONNX bytes
    import torch

    from fkp_core.model import KeypointNet
    from fkp_core.weights import LoadedModel


@dataclass
class Faces:
    """The faces of one image: the detector's boxes (N, 4) int32 and scores (N,), keypoints (N, 68, 2) float32; N may be 0."""

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def empty() -> Faces:
        return Faces(np.zeros((0, 4), np.int32), np.zeros((0, NUM_KEYPOINTS, 2), np.float32), np.zeros(0, np.float32))


def keypoints_and_scores_for_boxes(
    predict_crops, grays: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int, margin: float,
    angles: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Crop every box of every gray image (turned by its angle), run ``predict_crops`` once on all crops, map back.

    Returns (Ni, 68, 2) float32 keypoints per image (shape (0, 68, 2) where it has no box) and each
    point's score, (Ni, 68) float32, NaN where ``predict_crops`` gives no scores (it returns (N, 68, 2)
    rather than (N, 68, 3)).
    """
    crops, matrices, owner = [], [], []
    for i, (gray, bxs) in enumerate(zip(grays, boxes)):
        angs = angles[i] if angles is not None else np.zeros(len(bxs))
        for box, angle in zip(bxs, angs):
            crop, m = crop_face(gray, box, size, margin, float(angle))
            crops.append(crop)
            matrices.append(m)
            owner.append(i)
    result = [np.zeros((0, NUM_KEYPOINTS, 2), np.float32) for _ in grays]
    scores = [np.zeros((0, NUM_KEYPOINTS), np.float32) for _ in grays]
    if not crops:
        return result, scores
    normalized = np.asarray(predict_crops(np.stack(crops)))
    point_scores = normalized[..., 2] if normalized.shape[-1] > 2 else np.full(normalized.shape[:2], np.nan, np.float32)
    per_image: list[list[np.ndarray]] = [[] for _ in grays]
    per_image_scores: list[list[np.ndarray]] = [[] for _ in grays]
    for owner_i, kp, sc, m in zip(owner, normalized, point_scores, matrices):
        per_image[owner_i].append(uncrop_keypoints(kp[:, :2], m, size))
        per_image_scores[owner_i].append(sc)
    for i, kps in enumerate(per_image):
        if kps:
            result[i] = np.stack(kps).astype(np.float32)
            scores[i] = np.stack(per_image_scores[i]).astype(np.float32)
    return result, scores


def refined_keypoints(
    predict_crops, grays: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int, margin: float,
    angles: Sequence[np.ndarray] | None, refine: int, upright: bool, mirror_offset: float | None = None,
    shift_pixels: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """:func:`keypoints_and_scores_for_boxes`, then ``refine`` more passes, each cropped around the last
    prediction (the framing the model was trained on, eyes level when ``upright``): a detector's loose
    box costs accuracy that one re-crop wins back. With a ``mirror_offset`` (the model's, :mod:`fkp_core.mirror`)
    the last crop is also predicted on its mirror image, and the two predictions are averaged; with ``shift_pixels``
    the last crop (and its mirror image) is also predicted shifted by that much (:mod:`fkp_core.shifted_view`). Returns
    keypoints, the points' scores (of the mirrored pass where there is one) and the crop boxes (Ni, 4) of
    the last crop (what the fit's consistency is measured against)."""
    last = predict_crops if mirror_offset is None else averaged(predict_crops, mirror_offset)
    if shift_pixels:
        last = with_shifted_view(last, shift_pixels)
    for i in range(refine + 1):
        if i:
            frames = [face_frame(k, upright) if len(k) else (b, np.zeros(len(b))) for k, b in zip(kps, boxes)]
            boxes, angles = [f[0] for f in frames], [f[1] for f in frames]
        kps, scores = keypoints_and_scores_for_boxes(last if i == refine else predict_crops, grays, boxes, size, margin, angles)
    return kps, scores, list(boxes)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Landmarker:
    """Predict 68 keypoints for every face in images (the bundled model and the default detector, YuNet)."""

    def __init__(
        self,
        model: KeypointNet | LoadedModel | str | os.PathLike | None = None,
        detector: FaceDetector | None = None,
        device: str | torch.device = "cpu",
        refine: int = 1,
        backend: str = "auto",
        upright: bool = True,
        mirror: bool = True,
        shifted_view: bool = False,
    ):
        from fkp_core.inference import make_predictor
        from fkp_core.weights import LoadedModel, load_model

        self.device = resolve_device(device)
        if model is None or isinstance(model, (str, os.PathLike, Path)):
            model = load_model(model)
        # what was fitted to this model (a bare network: the default's face-confidence weights, no mirrored pass);
        # the refine pass on the mirrored crop (fkp_core.mirror) runs where its offset was fitted and ``mirror``
        self.fit = ModelFit()
        if isinstance(model, LoadedModel):
            self.fit, model = model.fit, model.model
        self.fit = self.fit.mirrored(mirror)
        self.model = model.eval()
        self.size = self.model.config.input_size
        self.margin = self.model.config.crop_margin
        self.detector = detector if detector is not None else make_detector(DetectorSpec())
        self.refine = refine
        self.upright = upright
        # the last crop also predicted shifted half a heatmap cell (fkp_core.shifted_view): one more look, one more pass
        self.shift_pixels = SHIFTED_VIEW_PIXELS if shifted_view else 0
        self.predictor = make_predictor(self.model, self.device, backend, scores=True)

    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S) gray crops (uint8 or float in [0, 1]) -> (N, 68, 3) keypoints in [-1, 1] and each point's
        score in 0..1 (:mod:`fkp_core.confidence`); (N, 68, 2), no scores, for models without a heatmap head."""
        return self.predictor(crops)

    def keypoints_in_boxes(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], angles: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Keypoints (Ni, 68, 2) in image pixels for the given crop boxes (and angles) of each image, one CNN batch for all."""
        return self.keypoints_and_scores_in_boxes(images, boxes, angles)[0]

    def keypoints_and_scores_in_boxes(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], angles: Sequence[np.ndarray] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:meth:`keypoints_in_boxes` and the points' scores (Ni, 68) of the last pass (NaN: the model has none)."""
        return self.predict_passes(images, boxes, angles)[:2]

    def predict_passes(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], angles: Sequence[np.ndarray] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Keypoints, their scores and the crop boxes (Ni, 4) of the last pass (what the fit's consistency is measured against)."""
        grays = [to_gray(np.asarray(im)) for im in images]
        boxes = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes]
        return refined_keypoints(self.predict_crops, grays, boxes, self.size, self.margin, angles, self.refine, self.upright,
                                 self.fit.mirror_offset, self.shift_pixels)

    def keypoints_for_detections(self, images: Sequence[np.ndarray], detections: Sequence) -> list[np.ndarray]:
        """Keypoints for each image's :class:`~fkp_core.detector.Detections`, cropped through the detector's calibration."""
        regions = [self.detector.calibration.crop_regions(d, self.upright) for d in detections]
        return self.keypoints_in_boxes(images, [r[0] for r in regions], [r[1] for r in regions])

    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """Detect and landmark every face of each image."""
        detections = [self.detector.detect(im) for im in images]
        keypoints = self.keypoints_for_detections(images, detections)
        return [Faces(np.round(d.boxes).astype(np.int32).reshape(-1, 4), k, d.scores) for d, k in zip(detections, keypoints)]

    def __call__(self, image: np.ndarray) -> Faces:
        return self.detect([image])[0]
