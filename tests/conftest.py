"""Shared fixtures: real data when present (skip otherwise), generated faces and data sets, one Ray session."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from fkp_core.constants import NUM_KEYPOINTS

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    """The shared data folder: $FKP_DATA, else ../shared/data beside the project; None when absent."""
    env = os.environ.get("FKP_DATA")
    for candidate in ([Path(env)] if env else []) + [PROJECT_ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not available (set FKP_DATA)")
    return root


def imagenet_weights(backbone: str = "mobilenet_v2") -> Path:
    """The backbone's ImageNet weights file (the 'train' extra); the test skips where it is not installed."""
    from fkp_core.backbones import PretrainedError, pretrained_path

    try:
        return Path(pretrained_path(backbone))
    except PretrainedError as exc:
        pytest.skip(str(exc))


def mean_face(size: int = 100, center: tuple[float, float] = (50.0, 52.0)) -> np.ndarray:
    """A plausible 68-point frontal face (iBUG layout) of width ``size``: jaw, brows, nose, eyes, mouth."""
    s = size / 100.0
    pts = []
    for t in np.linspace(np.pi * 0.95, np.pi * 0.05, 17):  # jaw: from the image left (subject right) round the chin
        pts.append((44 * np.cos(t), 5 + 45 * np.sin(t)))
    for i in range(5):
        pts.append((-38 + 7 * i, -22 - 4 * np.sin(np.pi * i / 4)))  # subject's right brow
    for i in range(5):
        pts.append((10 + 7 * i, -22 - 4 * np.sin(np.pi * i / 4)))
    for i in range(4):
        pts.append((0, -14 + 6 * i))  # nose bridge
    for i in range(5):
        pts.append((-8 + 4 * i, 8 + 2 * (1 - abs(i - 2) / 2)))
    for cx in (-20, 20):  # eyes: 6 points each
        for t in np.linspace(0, 2 * np.pi, 6, endpoint=False):
            pts.append((cx - 9 * np.cos(t), -10 - 3.5 * np.sin(t)))
    for t in np.linspace(0, 2 * np.pi, 12, endpoint=False):  # outer lips
        pts.append((-17 * np.cos(t), 25 + 7 * np.sin(t)))
    for t in np.linspace(0, 2 * np.pi, 8, endpoint=False):  # inner lips
        pts.append((-11 * np.cos(t), 25 + 3 * np.sin(t)))
    kp = np.asarray(pts, dtype=np.float32) * s + np.asarray(center, dtype=np.float32)
    assert kp.shape == (NUM_KEYPOINTS, 2)
    return kp


def dot_image(keypoints: np.ndarray, shape: tuple[int, int], radius: int = 3) -> np.ndarray:
    """Black image with a flat disc under each keypoint; disc i has gray level 60 + 2.5 * i (its label)."""
    img = np.zeros(shape, np.uint8)
    for i, (x, y) in enumerate(keypoints):
        cv2.circle(img, (int(round(x)), int(round(y))), radius, int(60 + 2.5 * i), -1)
    return img


def grid_keypoints(center: tuple[float, float], spacing: float = 14.0) -> np.ndarray:
    """68 points on a 9x8 grid (well apart, so their discs never touch)."""
    ys, xs = np.mgrid[0:8, 0:9]
    pts = np.stack([xs.ravel(), ys.ravel()], 1)[:NUM_KEYPOINTS].astype(np.float32)
    pts = (pts - pts.mean(0)) * spacing + np.asarray(center, np.float32)
    return pts


def write_course_layout(root: Path, rows: list[tuple[str, np.ndarray]], images: dict[str, np.ndarray], split: str = "training") -> Path:
    """Write a course-layout data set: {split}_frames_keypoints.csv + {split}/ images."""
    (root / split).mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        cv2.imwrite(str(root / split / name) if not name.endswith(".jpg") else str(root / split / name), img)
    header = "," + ",".join(str(i) for i in range(2 * NUM_KEYPOINTS))
    lines = [header] + [name + "," + ",".join(f"{v:.3f}" for v in kp.ravel()) for name, kp in rows]
    (root / f"{split}_frames_keypoints.csv").write_text("\n".join(lines) + "\n")
    return root


def face_image(keypoints: np.ndarray, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A gray drawing of a face from its keypoints (skin disc, dark eyes, brows, nostrils, mouth) on noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, size=shape, dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    hull = cv2.convexHull(np.round(keypoints).astype(np.int32))
    cv2.fillConvexPoly(img, hull, 190)
    for idx in (range(36, 42), range(42, 48), range(48, 60)):
        cv2.fillPoly(img, [np.round(keypoints[list(idx)]).astype(np.int32)], 40)
    for idx in (range(17, 22), range(22, 27), range(27, 31), range(31, 36)):
        cv2.polylines(img, [np.round(keypoints[list(idx)]).astype(np.int32)], False, 70, 2)
    return img


def make_course_dataset(root: Path, n: int = 24, people: int = 6, size: int = 120, split: str = "training", seed: int = 0) -> Path:
    """A small course-layout data set of drawn faces with known keypoints (n images, ``people`` identities)."""
    rng = np.random.default_rng(seed)
    rows, images = [], {}
    for i in range(n):
        face = mean_face(size * rng.uniform(0.45, 0.6), center=(size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)))
        name = f"Person_{i % people:02d}_{i:02d}.jpg"
        images[name] = face_image(face, (size, size), seed=i)
        rows.append((name, face))
    return write_course_layout(root, rows, images, split)


def write_pts(path: Path, keypoints: np.ndarray, one_based: bool = True) -> None:
    body = "\n".join(f"{x + (1 if one_based else 0):.3f} {y + (1 if one_based else 0):.3f}" for x, y in keypoints)
    path.write_text(f"version: 1\nn_points:  {len(keypoints)}\n{{\n{body}\n}}\n")


def make_ibug_dataset(root: Path, n: int = 12, size: int = 120, seed: int = 1) -> Path:
    """A small iBUG folder: NAME.jpg + NAME.pts (1-based) of drawn faces."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        face = mean_face(size * rng.uniform(0.45, 0.6), center=(size / 2, size / 2 + rng.uniform(-5, 5)))
        cv2.imwrite(str(root / f"{1000 + i}_1.jpg"), face_image(face, (size, size), seed=100 + i))
        write_pts(root / f"{1000 + i}_1.pts", face)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole suite (start-up costs ~10 s on 2 cores)."""
    from jobs.common import init_ray

    import ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def copy_model(name: str, dest: Path, **fields) -> Path:
    """A bundled model copied to ``dest`` (.pt + .json) with JSON fields set, or removed where given None."""
    import json
    import shutil

    from fkp_core.weights import resolve_model_path

    src = resolve_model_path(name)
    shutil.copyfile(src.with_suffix(".pt"), dest.with_suffix(".pt"))
    meta = json.loads(src.with_suffix(".json").read_text())
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    dest.with_suffix(".json").write_text(json.dumps(meta))
    return dest.with_suffix(".pt")
