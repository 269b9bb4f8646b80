"""Face detection behind a small protocol; OpenCV's bundled Haar cascades as the implementation.

A detector maps an image (gray or BGR, any size) to an (N, 4) int32 array of (x, y, w, h)
boxes in that image's pixels, empty (shape (0, 4)) when there is no face: never None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from fkp_core.transforms import to_gray

NO_BOXES = np.zeros((0, 4), dtype=np.int32)


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, image: np.ndarray) -> np.ndarray:
        """(N, 4) int32 boxes (x, y, w, h) in the image's pixels; shape (0, 4) when none."""
        ...


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

    def __post_init__(self) -> None:
        if not 0 < self.downscale <= 1:
            raise ValueError(f"downscale must be in (0, 1], got {self.downscale}")
        if self.scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {self.scale_factor}")
        if self.min_neighbors < 0 or self.min_size < 1:
            raise ValueError("min_neighbors must be >= 0 and min_size >= 1")


_FRONTAL, _ALT2, _PROFILE = "haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml", "haarcascade_profileface.xml"

# fast: OpenCV's default frontal cascade. recall: frontal + alt2 + profile (both directions) at a
# finer scale step: finds 96.7% of AFW's annotated faces against 87.2% (see the README's table).
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


class HaarDetector:
    """Viola-Jones face detection with OpenCV's cascades (frontal face by default)."""

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

    def detect(self, image: np.ndarray) -> np.ndarray:
        cfg = self.config
        gray = to_gray(np.asarray(image))
        if gray.dtype != np.uint8:
            gray = np.clip(gray * (255.0 if gray.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if gray.size == 0:
            return NO_BOXES.copy()
        scale = cfg.downscale
        if scale < 1:
            h, w = gray.shape
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        if cfg.equalize:
            gray = cv2.equalizeHist(gray)
        min_side = max(1, round(cfg.min_size * scale))
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
            return NO_BOXES.copy()
        boxes = found[0]
        for more in found[1:]:  # keep a later cascade's box only where no earlier one overlaps it
            keep = iou(more, boxes).max(axis=1) < cfg.nms_iou
            boxes = np.concatenate([boxes, more[keep]])
        if scale < 1:
            boxes = boxes / scale
        return np.round(boxes).astype(np.int32).reshape(-1, 4)

    def to_dict(self) -> dict:
        return asdict(self.config)
