"""Face detection behind one protocol: YuNet (a small CNN, the default) and OpenCV's Haar cascades.

A detector maps an image (gray or BGR, any size) to :class:`Detections`: boxes, the detector's
score and, where it has them, five points (eyes, nose tip, mouth corners); empty arrays when
there is no face, never None. Each detector owns its box-to-crop calibration
(:class:`BoxCalibration`): how its boxes sit on a face relative to the crop box the landmark
model was trained on (:func:`~fkp_core.transforms.face_frame`), so that a YuNet box and a Haar
box of the same face give the model the same crop. Where a detector gives eye points the crop is
turned upright (eyes level).

Both detectors are built from one :class:`DetectorSpec`, the same for ``jobs.annotate`` and
``jobs.evaluate``. Its ``min_face`` (the smallest face that must still be found, in frame
pixels) sets the scale detection runs at, so its cost does not grow with the frame's resolution;
in frames too small for that face size (still images, thumbnails) the smallest face searched for
shrinks with the frame (:func:`effective_min_face`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from fkp_core.transforms import to_gray

ASSETS = Path(__file__).resolve().parent / "assets"
YUNET_MODEL = ASSETS / "yunet" / "yunet_n_640_640.onnx"
# The smallest face searched for is at most this share of the frame's shorter side: in a frame
# smaller than 8 x --min-face the face that fills an eighth of it is still found.
MIN_FACE_FRACTION = 1 / 8
CASCADE_WINDOW = 24  # pixels: the frontal Haar cascade's detection window
YUNET_WINDOW = 18  # pixels: the YuNet box width a --min-face face is shrunk to (its finest stride is 8: docs/detection.md)
YUNET_SCORE = 0.7  # default score threshold (chosen on the development data: README, Detection)
DETECTORS = ("yunet", "fast", "recall")  # --detector choices: YuNet, then the Haar presets
DEFAULT_DETECTOR = "yunet"


# --------------------------------------------------------------------------------------------
# What a detector returns, and how its boxes become crops
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, N >= 0 of them.

    ``points``: subject's right eye, left eye, nose tip, right and left mouth corner (the right
    eye is on the image's left in a frontal photo); NaN for detectors without points (Haar).
    """

    boxes: np.ndarray  # (N, 4) float32 x, y, w, h in image pixels
    scores: np.ndarray  # (N,) float32, higher is more certain (Haar: 1)
    points: np.ndarray  # (N, 5, 2) float32 image pixels

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    @staticmethod
    def from_boxes(boxes: np.ndarray) -> Detections:
        """Boxes alone (score 1, no points)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        return Detections(boxes, np.ones(len(boxes), np.float32), np.full((len(boxes), 5, 2), np.nan, np.float32))

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.points[keep])

    @property
    def has_eyes(self) -> np.ndarray:
        return np.isfinite(self.points[:, :2]).all(axis=(1, 2))


@dataclass(frozen=True)
class BoxCalibration:
    """Where the model's crop box lies relative to a detector's box, measured on training faces.

    Crop box side = ``scale`` x the detector box's side (its width for ``side="width"``, else the
    larger of width and height); its centre = the box centre + (``shift_x``, ``shift_y``) box sides,
    in the face's upright frame (turned by the eye line where the detector gives eye points).
    """

    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    side: str = "max"  # max | width
    source: str = ""  # how it was measured

    def crop_regions(self, detections: Detections, upright: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes (N, 4) float64 and angles (N,) radians for :func:`~fkp_core.transforms.crop_matrix`."""
        boxes = detections.boxes.astype(np.float64)
        n = len(boxes)
        angles = np.zeros(n)
        if upright and n:
            eyes = detections.points[:, :2].astype(np.float64)
            d = eyes[:, 1] - eyes[:, 0]
            ok = detections.has_eyes & (np.hypot(d[:, 0], d[:, 1]) > 0)
            angles = np.where(ok, np.arctan2(d[:, 1], d[:, 0]), 0.0)
        side = boxes[:, 2] if self.side == "width" else np.maximum(boxes[:, 2], boxes[:, 3])
        c, s = np.cos(angles), np.sin(angles)
        dx, dy = self.shift_x * side, self.shift_y * side
        cx = boxes[:, 0] + boxes[:, 2] / 2 + c * dx - s * dy
        cy = boxes[:, 1] + boxes[:, 3] / 2 + s * dx + c * dy
        crop = self.scale * side
        return np.stack([cx - crop / 2, cy - crop / 2, crop, crop], axis=1), angles

    def detector_side(self, crop_side: float) -> float:
        """The detector's box side for a face whose crop box has this side."""
        return crop_side / self.scale


@runtime_checkable
class FaceDetector(Protocol):
    calibration: BoxCalibration

    def detect(self, image: np.ndarray) -> Detections:
        """Every face of a gray or BGR image; empty :class:`Detections` when none."""
        ...


def effective_min_face(shape: tuple[int, ...], min_face: float) -> float:
    """The smallest face to search for in a frame of this shape (see :data:`MIN_FACE_FRACTION`)."""
    return max(1.0, min(float(min_face), min(shape[0], shape[1]) * MIN_FACE_FRACTION))


def _as_gray_u8(image: np.ndarray) -> np.ndarray:
    gray = to_gray(np.asarray(image))
    if gray.dtype != np.uint8:
        gray = np.clip(gray * (255.0 if gray.size and gray.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return gray


def _resized(image: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xywh boxes -> (N, M)."""
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]
    x1 = np.maximum(a[..., 0], b[..., 0])
    y1 = np.maximum(a[..., 1], b[..., 1])
    x2 = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
    y2 = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


# --------------------------------------------------------------------------------------------
# YuNet
# --------------------------------------------------------------------------------------------

# Measured on the course training images and HELEN (never AFW) by `python -m jobs.calibrate`:
# the median crop box of face_frame(ground truth, upright) relative to the matched YuNet box.
YUNET_CALIBRATION = BoxCalibration(
    scale=1.227, shift_x=0.0062, shift_y=-0.0171, side="width",
    source="python -m jobs.calibrate --detector yunet --data course:fkp --data ibug:300w/helen --every 3 --every 2 (1589 faces)",
)


@dataclass(frozen=True)
class YuNetConfig:
    """YuNet settings. ``downscale`` None: the scale at which a ``min_face`` face is ``window`` pixels wide."""

    model: str = str(YUNET_MODEL)
    score_threshold: float = YUNET_SCORE
    nms_iou: float = 0.3
    min_face: int = 64  # smallest face that must still be found: its crop-box side in frame pixels
    window: int = YUNET_WINDOW
    downscale: float | None = None
    top_k: int = 5000
    calibration: BoxCalibration = field(default_factory=lambda: YUNET_CALIBRATION)

    def __post_init__(self) -> None:
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.downscale is not None and not 0 < self.downscale <= 1:
            raise ValueError(f"downscale must be in (0, 1], got {self.downscale}")
        if self.min_face < 1 or self.window < 1:
            raise ValueError("min_face and window must be >= 1")


class YuNetDetector:
    """YuNet (libfacedetection, Apache-2.0) through OpenCV's ``cv2.FaceDetectorYN``: boxes, five points, score."""

    def __init__(self, config: YuNetConfig | None = None):
        self.config = config or YuNetConfig()
        self.calibration = self.config.calibration
        path = Path(self.config.model)
        if not path.is_file():
            raise FileNotFoundError(f"YuNet model {path} not found (reinstall fkp: it ships in fkp_core/assets/yunet)")
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), self.config.score_threshold,
                                              self.config.nms_iou, self.config.top_k)
        self._size = (320, 320)

    def __reduce__(self):  # cv2 objects do not pickle; rebuild from the config in Ray workers
        return (YuNetDetector, (self.config,))

    def scale_for(self, shape: tuple[int, ...]) -> float:
        """The factor a frame of this shape is shrunk by before detection."""
        cfg = self.config
        if cfg.downscale is not None:
            return cfg.downscale
        smallest = self.calibration.detector_side(effective_min_face(shape, cfg.min_face))
        return min(1.0, cfg.window / smallest)

    def detect(self, image: np.ndarray) -> Detections:
        image = np.asarray(image)
        if image.size == 0 or min(image.shape[:2]) < 2:
            return Detections.empty()
        scale = self.scale_for(image.shape)
        small = _resized(image if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 else _as_gray_u8(image), scale)
        if small.ndim == 2:
            small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, faces = self._net.detect(small)
        if faces is None or not len(faces):
            return Detections.empty()
        sx = image.shape[1] / small.shape[1]
        sy = image.shape[0] / small.shape[0]
        boxes = faces[:, :4] * np.array([sx, sy, sx, sy], np.float32)
        points = (faces[:, 4:14].reshape(-1, 5, 2) + 0.5) * np.array([sx, sy], np.float32) - 0.5
        return Detections(boxes.astype(np.float32), faces[:, 14].astype(np.float32), points.astype(np.float32))

    def to_dict(self) -> dict:
        return {"detector": "yunet", **asdict(self.config)}


# --------------------------------------------------------------------------------------------
# Haar (the seeds' method)
# --------------------------------------------------------------------------------------------

# The model's crop box was defined on the mean Haar box (fkp_core.transforms.BOX_SCALE/BOX_SHIFT_Y,
# measured on the course training images), so the frontal cascade's boxes need no correction.
HAAR_CALIBRATION = BoxCalibration(source="identity: the crop box (transforms.box_from_keypoints) is the mean Haar box")


@dataclass(frozen=True)
class HaarConfig:
    """Haar cascade settings. ``downscale`` < 1 detects on a smaller copy of the frame (faster)."""

    cascades: tuple[str, ...] = ("haarcascade_frontalface_default.xml",)
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 30  # in pixels of the full-size image
    max_size: int = 0  # 0: no limit
    downscale: float = 1.0
    equalize: bool = False
    nms_iou: float = 0.3  # merges the boxes of several cascades
    mirror: tuple[str, ...] = ()  # cascades also run on the mirrored image (profile cascades see one side)
    adapt_to_frame: bool = False  # small frames: min_size and downscale follow effective_min_face

    def __post_init__(self) -> None:
        if not 0 < self.downscale <= 1:
            raise ValueError(f"downscale must be in (0, 1], got {self.downscale}")
        if self.scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {self.scale_factor}")
        if self.min_neighbors < 0 or self.min_size < 1:
            raise ValueError("min_neighbors must be >= 0 and min_size >= 1")


_FRONTAL, _ALT2, _PROFILE = "haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml", "haarcascade_profileface.xml"

# fast: OpenCV's default frontal cascade. recall: frontal + alt2 + profile (both directions) at a
# finer scale step (more faces, slower: see the README's Accuracy table).
HAAR_PRESETS: dict[str, HaarConfig] = {
    "fast": HaarConfig(),
    "recall": HaarConfig(cascades=(_FRONTAL, _ALT2, _PROFILE), mirror=(_PROFILE,), scale_factor=1.05, min_neighbors=3),
}


def cascade_path(name: str) -> Path:
    """A cascade file by name (from OpenCV's bundled folder) or by path."""
    p = Path(name)
    if p.is_file():
        return p
    bundled = Path(cv2.data.haarcascades) / name
    if not bundled.is_file():
        raise FileNotFoundError(f"Haar cascade {name!r} not found (looked in {cv2.data.haarcascades})")
    return bundled


class HaarDetector:
    """Viola-Jones face detection with OpenCV's cascades (frontal face by default)."""

    calibration = HAAR_CALIBRATION
    scored = False  # its scores are all 1: the face confidence then rests on the landmark fit alone

    def __init__(self, config: HaarConfig | None = None):
        self.config = config or HaarConfig()
        self._cascades = []
        for name in self.config.cascades:
            cascade = cv2.CascadeClassifier(str(cascade_path(name)))
            if cascade.empty():
                raise RuntimeError(f"OpenCV could not load Haar cascade {name!r}")
            self._cascades.append(cascade)

    def __reduce__(self):  # cv2 cascades do not pickle; rebuild from the config in Ray workers
        return (HaarDetector, (self.config,))

    def _scale_and_min(self, shape: tuple[int, ...]) -> tuple[float, float]:
        cfg = self.config
        if not cfg.adapt_to_frame:
            return cfg.downscale, cfg.min_size
        min_size = effective_min_face(shape, cfg.min_size)
        return min(1.0, CASCADE_WINDOW / min_size), min_size

    def detect(self, image: np.ndarray) -> Detections:
        return Detections.from_boxes(self.detect_boxes(image))

    def detect_boxes(self, image: np.ndarray) -> np.ndarray:
        """(N, 4) int32 boxes: the cascades' own output."""
        cfg = self.config
        if np.asarray(image).size == 0:
            return np.zeros((0, 4), np.int32)
        gray = _as_gray_u8(image)
        scale, min_size = self._scale_and_min(gray.shape)
        gray = _resized(gray, scale)
        if cfg.equalize:
            gray = cv2.equalizeHist(gray)
        min_side = max(1, round(min_size * scale))
        max_side = round(cfg.max_size * scale) if cfg.max_size else 0
        kwargs = {"maxSize": (max_side, max_side)} if max_side else {}
        found = []
        mirrored = None
        for name, cascade in zip(cfg.cascades, self._cascades):
            views = [(gray, False)]
            if name in cfg.mirror:
                mirrored = cv2.flip(gray, 1) if mirrored is None else mirrored
                views.append((mirrored, True))
            for view, flipped in views:
                boxes = cascade.detectMultiScale(
                    view, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(min_side, min_side), **kwargs
                )
                if len(boxes):
                    boxes = np.asarray(boxes, dtype=np.float64)
                    if flipped:
                        boxes[:, 0] = view.shape[1] - boxes[:, 0] - boxes[:, 2]
                    found.append(boxes)
        if not found:
            return np.zeros((0, 4), np.int32)
        boxes = found[0]
        for more in found[1:]:  # keep a later cascade's box only where no earlier one overlaps it
            keep = iou(more, boxes).max(axis=1) < cfg.nms_iou
            boxes = np.concatenate([boxes, more[keep]])
        if scale < 1:
            boxes = boxes / scale
        return np.round(boxes).astype(np.int32).reshape(-1, 4)

    def to_dict(self) -> dict:
        return {"detector": "haar", **asdict(self.config)}


# --------------------------------------------------------------------------------------------
# One configuration for every job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorSpec:
    """The detection settings a run uses (``--detector``, ``--min-face``, ...), for :func:`make_detector`."""

    name: str = DEFAULT_DETECTOR  # yunet | fast | recall (Haar presets)
    min_face: int = 64  # smallest face that must still be found, in frame pixels
    detect_scale: float | None = None  # None: follows min_face (and the frame size)
    score_threshold: float = YUNET_SCORE  # yunet
    scale_factor: float = 1.2  # Haar pyramid step

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:
            raise ValueError(f"unknown detector {self.name!r}; choose one of {', '.join(DETECTORS)}")


def make_detector(spec: DetectorSpec) -> FaceDetector:
    """The detector a run's settings describe: what ``jobs.annotate`` and ``jobs.evaluate`` both use."""
    if spec.name == "yunet":
        return YuNetDetector(YuNetConfig(score_threshold=spec.score_threshold, min_face=spec.min_face, downscale=spec.detect_scale))
    preset = HAAR_PRESETS[spec.name]
    downscale = spec.detect_scale or min(1.0, CASCADE_WINDOW / spec.min_face)
    return HaarDetector(
        HaarConfig(cascades=preset.cascades, mirror=preset.mirror, min_neighbors=preset.min_neighbors, scale_factor=spec.scale_factor,
                   min_size=spec.min_face, downscale=downscale, adapt_to_frame=spec.detect_scale is None)
    )
