"""Labelled faces from disk: the course CSV layout and iBUG ``.pts`` folders, behind one interface.

Every bad input names its file (and CSV row) in a :class:`DatasetError`, or is skipped with a
logged warning when the caller asks for ``on_error="skip"``: never a silently wrong sample.
All keypoints are returned 0-based, in pixels of the stored image (pixel centre = integer).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from fkp_core.constants import IMAGE_EXTENSIONS, LABEL_X_OFFSET, NUM_KEYPOINTS

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
COURSE_SPLITS = ("training", "test")
# iBUG .pts files count pixels from 1 (Matlab convention); the project counts from 0.
PTS_ORIGIN = 1.0


class DatasetError(ValueError):
    """A data file the loader refuses: the message names the file (and row)."""


@dataclass(frozen=True)
class Record:
    """One labelled face: where its image is and where its 68 points are."""

    image_path: Path
    keypoints: np.ndarray  # (68, 2) float32, 0-based image pixels
    person: str  # identity key for disjoint splits
    source: str  # name of the data source it came from
    origin: str  # "file:row" or the .pts path, for error messages


def person_of(name: str) -> str:
    """Identity of an image: its file-name stem before the last ``_`` (``Luis_Fonsi_21`` -> ``Luis_Fonsi``)."""
    stem = Path(name).stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def _fail(message: str, on_error: OnError) -> None:
    if on_error == "raise":
        raise DatasetError(message)
    log.warning("skipping: %s", message)


def read_image(path: str | os.PathLike, color: bool = False) -> np.ndarray:
    """Decode an image by content (RGBA PNG named ``.jpg`` included): gray (H, W) or BGR (H, W, 3) uint8."""
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read image ({exc.strerror or exc})") from exc
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        raise DatasetError(f"{path}: not a readable image")
    return image


def _image_ok(path: Path) -> str | None:
    if not path.is_file():
        return "image file is missing"
    try:
        read_image(path)
    except DatasetError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _parse_keypoints(values: Sequence[str], where: str) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        bad = next(v for v in values if not _is_float(v))
        raise DatasetError(f"{where}: non-numeric keypoint value {bad!r}") from None
    if not np.all(np.isfinite(numbers)):
        raise DatasetError(f"{where}: keypoint value is NaN or infinite")
    return numbers.reshape(NUM_KEYPOINTS, 2).astype(np.float32)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_course(
    root: str | os.PathLike,
    split: str = "training",
    on_error: OnError = "raise",
    verify_images: bool = True,
    source: str = "course",
) -> list[Record]:
    """Records of the Udacity layout: ``{split}_frames_keypoints.csv`` + ``{split}/`` images."""
    if split not in COURSE_SPLITS:
        raise ValueError(f"split must be one of {COURSE_SPLITS}, got {split!r}")
    root = Path(root)
    csv_path = root / f"{split}_frames_keypoints.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such file (expected the course layout under {root})")
    image_dir = root / split
    expected = 1 + 2 * NUM_KEYPOINTS
    records: list[Record] = []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) != expected:
            raise DatasetError(f"{csv_path}:1: header has {0 if header is None else len(header)} columns, expected {expected}")
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path}:{line}"
            if not row:
                continue
            if len(row) != expected:
                _fail(f"{where}: expected {expected} columns, got {len(row)}", on_error)
                continue
            try:
                keypoints = _parse_keypoints(row[1:], where)
            except DatasetError as exc:
                _fail(str(exc), on_error)
                continue
            image_path = image_dir / row[0]
            problem = _image_ok(image_path) if verify_images else None
            if problem:
                _fail(f"{where}: {image_path}: {problem}", on_error)
                continue
            records.append(Record(image_path, keypoints, person_of(row[0]), source, where))
    return records


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Parse one iBUG ``.pts`` file into (68, 2) float32, converted to 0-based pixels."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    header: dict[str, str] = {}
    try:
        open_at = lines.index("{")
    except ValueError:
        raise DatasetError(f"{path}: missing '{{' before the points") from None
    try:
        close_at = lines.index("}", open_at)
    except ValueError:
        raise DatasetError(f"{path}: missing '}}' after the points") from None
    for ln in lines[:open_at]:
        key, _, value = ln.partition(":")
        header[key.strip()] = value.strip()
    if "n_points" not in header:
        raise DatasetError(f"{path}: header has no n_points")
    try:
        declared = int(header["n_points"])
    except ValueError:
        raise DatasetError(f"{path}: n_points is not an integer: {header['n_points']!r}") from None
    body = lines[open_at + 1 : close_at]
    if declared != NUM_KEYPOINTS or len(body) != NUM_KEYPOINTS:
        raise DatasetError(
            f"{path}: expected {NUM_KEYPOINTS} points, header says {declared} and the file has {len(body)}"
        )
    values: list[str] = []
    for i, ln in enumerate(body):
        parts = ln.split()
        if len(parts) != 2:
            raise DatasetError(f"{path}: point {i} has {len(parts)} values, expected 2: {ln!r}")
        values.extend(parts)
    return _parse_keypoints(values, str(path)) - np.float32(PTS_ORIGIN)


def _image_for_pts(pts: Path) -> Path | None:
    stems = [pts.stem]
    if "_" in pts.stem:  # 300-W names several faces of one photo NAME_1.pts, NAME_2.pts
        stems.append(pts.stem.rsplit("_", 1)[0])
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (pts.with_name(stem + ext), pts.with_name(stem + ext.upper())):
                if candidate.is_file():
                    return candidate
    return None


def read_ibug(
    root: str | os.PathLike,
    on_error: OnError = "raise",
    verify_images: bool = True,
    source: str | None = None,
) -> list[Record]:
    """Records of a folder (searched recursively) of images with iBUG ``.pts`` files beside them."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory")
    source = source or root.name
    records: list[Record] = []
    for pts in sorted(root.rglob("*.pts")):
        try:
            keypoints = read_pts(pts)
        except DatasetError as exc:
            _fail(str(exc), on_error)
            continue
        image_path = _image_for_pts(pts)
        if image_path is None:
            _fail(f"{pts}: no image beside it (tried {pts.stem} with {', '.join(IMAGE_EXTENSIONS)})", on_error)
            continue
        problem = _image_ok(image_path) if verify_images else None
        if problem:
            _fail(f"{pts}: {image_path}: {problem}", on_error)
            continue
        records.append(Record(image_path, keypoints, person_of(pts.name), source, str(pts)))
    if not records and on_error == "raise":
        raise DatasetError(f"{root}: no .pts files found")
    return records


@dataclass(frozen=True)
class DataSource:
    """A named set of labelled faces and its sampling weight in training."""

    kind: Literal["course", "ibug"]
    path: Path
    weight: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or ("course" if self.kind == "course" else self.path.name)

    @property
    def label_x_offset(self) -> float:
        """How far right of what they mark its labels sit, in pixels (:data:`~fkp_core.constants.LABEL_X_OFFSET`)."""
        return LABEL_X_OFFSET[self.kind]

    def read(self, split: str = "training", on_error: OnError = "raise") -> list[Record]:
        """All records of this source (``split`` only matters for the course layout)."""
        if self.kind == "course":
            return read_course(self.path, split, on_error, source=self.label)
        return read_ibug(self.path, on_error, source=self.label)


def detect_kind(path: Path) -> Literal["course", "ibug"]:
    """Tell the layout of a folder from what it holds."""
    if (path / "training_frames_keypoints.csv").is_file() or (path / "test_frames_keypoints.csv").is_file():
        return "course"
    if path.is_dir() and next(path.rglob("*.pts"), None) is not None:
        return "ibug"
    raise DatasetError(f"{path}: neither the course layout (*_frames_keypoints.csv) nor iBUG .pts files")


def parse_source(spec: str) -> DataSource:
    """Parse ``[KIND:]PATH[@WEIGHT]`` (KIND is ``course`` or ``ibug``; detected from the folder when absent)."""
    body, weight = spec, 1.0
    if "@" in spec:
        body, _, w = spec.rpartition("@")
        try:
            weight = float(w)
        except ValueError:
            raise DatasetError(f"{spec}: weight after '@' must be a number") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise DatasetError(f"{spec}: weight must be positive")
    kind, sep, rest = body.partition(":")
    if sep and kind in ("course", "ibug"):
        path = Path(rest)
        if not path.exists():
            raise DatasetError(f"{path}: no such directory")
        return DataSource(kind, path, weight)  # type: ignore[arg-type]
    path = Path(body)
    if not path.exists():
        raise DatasetError(f"{path}: no such directory")
    return DataSource(detect_kind(path), path, weight)


def split_by_identity(
    records: Iterable[Record], val_fraction: float = 0.1, salt: str = "fkp"
) -> tuple[list[Record], list[Record]]:
    """Identity-disjoint train/validation split, stable across runs and machines (hash of the person)."""
    train: list[Record] = []
    val: list[Record] = []
    for rec in records:
        (val if hash_unit(f"{salt}:{rec.source}:{rec.person}") < val_fraction else train).append(rec)
    return train, val


def hash_unit(key: str) -> float:
    """A key's stable place in [0, 1) (SHA-256): splits and subsets by identity that no run or machine changes."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
