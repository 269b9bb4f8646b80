"""Measure a detector's box-to-crop calibration on labelled faces.

The landmark model is trained on crops of :func:`~fkp_core.transforms.face_frame` boxes. A
detector's boxes sit differently on a face (YuNet's are tall and start at the brows; Haar's are
square and larger); :class:`~fkp_core.detector.BoxCalibration` maps one onto the other. This
module measures it the way the Haar framing was measured: detect on training images, match each
detection to its annotated face, and take the median size ratio and centre offset, in the
face's upright frame, over all matched faces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fkp_core.detector import BoxCalibration, FaceDetector, iou
from fkp_core.transforms import face_frame

MATCH_IOU = 0.3


@dataclass(frozen=True)
class CalibrationResult:
    """The fitted calibration and how well it holds: spreads are interquartile ranges."""

    calibration: BoxCalibration
    faces: int  # labelled faces seen
    matched: int  # of them, with a detection overlapping the annotated face
    scale_iqr: float  # of crop side / detector side
    shift_iqr: tuple[float, float]  # of the centre offset, in detector box sides
    crop_error: float  # median |crop box centre error| / crop side after calibration


def _offsets(detections, crop_box: np.ndarray, side: str) -> tuple[float, float, float] | None:
    """(scale, shift_x, shift_y) of one face's crop box relative to its best detection, or None."""
    if not len(detections):
        return None
    overlap = iou(detections.boxes, crop_box[None])[:, 0]
    best = int(np.argmax(overlap))
    if overlap[best] < MATCH_IOU:
        return None
    box = detections.boxes[best].astype(np.float64)
    det_side = box[2] if side == "width" else max(box[2], box[3])
    angle = 0.0
    if detections.has_eyes[best]:
        d = detections.points[best, 1] - detections.points[best, 0]
        angle = float(np.arctan2(d[1], d[0]))
    delta = crop_box[:2] + crop_box[2:] / 2 - (box[:2] + box[2:] / 2)
    c, s = np.cos(angle), np.sin(angle)
    local = np.array([c * delta[0] + s * delta[1], -s * delta[0] + c * delta[1]])  # in the upright frame
    return crop_box[2] / det_side, local[0] / det_side, local[1] / det_side


def measure_calibration(
    detector: FaceDetector, samples: Iterable[tuple[np.ndarray, np.ndarray]], side: str = "max", source: str = ""
) -> CalibrationResult:
    """Fit a :class:`BoxCalibration` from (image, 68 ground-truth keypoints) pairs."""
    rows, faces, kept = [], 0, []
    for image, keypoints in samples:
        faces += 1
        crop_box = face_frame(np.asarray(keypoints, np.float64), upright=True)[0]
        detections = detector.detect(image)
        got = _offsets(detections, crop_box, side)
        if got is not None:
            rows.append(got)
            kept.append((detections, crop_box))
    if not rows:
        raise ValueError("no detection matched an annotated face: nothing to calibrate on")
    a = np.asarray(rows)
    med = np.median(a, axis=0)
    q = np.percentile(a, [25, 75], axis=0)
    cal = BoxCalibration(scale=round(float(med[0]), 4), shift_x=round(float(med[1]), 4), shift_y=round(float(med[2]), 4),
                         side=side, source=source)
    errors = []
    for detections, crop_box in kept:
        boxes, _ = cal.crop_regions(detections, upright=True)
        best = int(np.argmax(iou(detections.boxes, crop_box[None])[:, 0]))
        centre_err = np.hypot(*(boxes[best, :2] + boxes[best, 2:] / 2 - crop_box[:2] - crop_box[2:] / 2))
        errors.append(centre_err / crop_box[2])
    return CalibrationResult(cal, faces, len(rows), float(q[1, 0] - q[0, 0]),
                             (float(q[1, 1] - q[0, 1]), float(q[1, 2] - q[0, 2])), float(np.median(errors)))
