"""Annotated copies of inputs: every frame decoded again, the finished rows drawn on it, encoded in order.

Frames stream from the decoder through the filters into the encoder one at a time, so a long
video never sits in memory. The output has the input's frame count, size and exact frame rate;
frames without faces are copied unchanged. Still images are written as images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from fkp_core.constants import IMAGE_EXTENSIONS
from fkp_core.filters import apply_filters
from fkp_core.store import atomic_local_path
from fkp_core.tables import FaceColumns, columns_from_table
from fkp_core.video import VideoWriter, probe, read_frames

RENDER_SUFFIX = ".mp4"


def _by_frame(cols: FaceColumns) -> dict[int, np.ndarray]:
    """Row indices of each frame."""
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(cols.frame_index):
        groups.setdefault(int(f), []).append(i)
    return {f: np.asarray(rows) for f, rows in groups.items()}


def render_annotated(path: str, video_id: str, rows: pa.Table | FaceColumns, out_dir: str, filters: Sequence[str]) -> str:
    """Write ``out_dir/<video_id>.mp4`` (or ``.<ext>`` for an image) with ``filters`` applied; returns its path."""
    cols = rows if isinstance(rows, FaceColumns) else columns_from_table(rows)
    groups = _by_frame(cols)
    info = probe(path)
    os.makedirs(out_dir, exist_ok=True)

    def draw(index: int, image: np.ndarray) -> np.ndarray:
        rows_here = groups.get(index)
        if rows_here is None:
            return image
        return apply_filters(image, cols.boxes[rows_here], cols.keypoints[rows_here], list(filters))

    if info.is_image:
        suffix = Path(path).suffix.lower()
        suffix = suffix if suffix in IMAGE_EXTENSIONS else ".png"
        target = Path(out_dir) / f"{video_id}{suffix}"
        frame = next(iter(read_frames(path, 0, 1, gray=False)))
        ok, buf = cv2.imencode(suffix, draw(0, np.ascontiguousarray(frame.image)))
        if not ok:
            raise OSError(f"{target}: could not encode image")
        with atomic_local_path(target) as tmp:  # a unique temporary name, removed if the write fails
            Path(tmp).write_bytes(buf.tobytes())
        return str(target)
    target = Path(out_dir) / f"{video_id}{RENDER_SUFFIX}"
    rate = info.rate if info.rate else info.fps
    width, height = info.display_size  # upright, as a player shows the input and as its keypoints are
    with VideoWriter(target, rate, width, height, threads=1) as writer:
        for frame in read_frames(path, 0, None, gray=False, upright=True, on_error="skip", threads=1,
                                 sequential=info.variable_rate):
            writer.write(draw(frame.index, np.ascontiguousarray(frame.image)))
    return str(target)
