"""The Parquet output: schemas of the per-face and per-video tables, and writes that are all-or-nothing.

Output folder layout (a local path or any pyarrow filesystem URI such as ``s3://bucket/run``)::

    OUT/part-<video_id>.parquet     faces of one video, ordered by frame then face
    OUT/_videos.parquet             one row per input: status, counts, timings
    OUT/_status/<video_id>.json     per-video status records (the source of _videos.parquet)
    OUT/_segments/<video_id>/...    work in progress, removed when the video is finished

pyarrow (and so pandas) ignores names starting with ``_`` when it reads a folder as a dataset,
so ``pd.read_parquet(OUT)`` returns the faces of all videos; globbing ``OUT/part-*.parquet``
does the same in DuckDB and polars. Every file is written under a temporary name and renamed
(or, on object stores, uploaded in one piece), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fkp_core.constants import NUM_KEYPOINTS

KEYPOINT_VALUES = 2 * NUM_KEYPOINTS
KEYPOINTS_TYPE = pa.list_(pa.float32(), KEYPOINT_VALUES)  # x0, y0, x1, y1, ... in frame pixels
KEYPOINT_SCORES_TYPE = pa.list_(pa.float32(), NUM_KEYPOINTS)  # one score in 0..1 per keypoint (NaN: the model gives none)

FACE_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("track_id", pa.int64(), nullable=False),
        pa.field("box_x", pa.int32(), nullable=False),
        pa.field("box_y", pa.int32(), nullable=False),
        pa.field("box_w", pa.int32(), nullable=False),
        pa.field("box_h", pa.int32(), nullable=False),
        pa.field("detected", pa.bool_(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("keypoints", KEYPOINTS_TYPE, nullable=False),
        pa.field("keypoints_raw", KEYPOINTS_TYPE, nullable=False),
        pa.field("yaw", pa.float32(), nullable=False),
        pa.field("pitch", pa.float32(), nullable=False),
        pa.field("roll", pa.float32(), nullable=False),
        pa.field("keypoint_scores", KEYPOINT_SCORES_TYPE, nullable=False),
    ],
    metadata={"keypoints": "68 (x, y) pairs in frame pixels, iBUG-68 order, flattened x0,y0,...,x67,y67",
              "keypoint_scores": "68 scores in 0..1, how sharply the model located each keypoint (fkp_core.confidence)"},
)

VIDEO_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("status", pa.string()),  # ok | partial | failed
        pa.field("error", pa.string()),
        pa.field("frames_expected", pa.int64()),
        pa.field("frames_decoded", pa.int64()),
        pa.field("frames_annotated", pa.int64()),  # all decoded frames, or the sampled ones (--sample-fps)
        pa.field("sample_fps", pa.float64()),  # null: every frame
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("rotation", pa.int32()),  # display rotation applied (0/90/180/270): size and keypoints are upright
        pa.field("frames_with_faces", pa.int64()),
        pa.field("faces", pa.int64()),
        pa.field("tracks", pa.int64()),
        pa.field("segments", pa.int32()),
        pa.field("seconds", pa.float64()),
        pa.field("output", pa.string()),
        pa.field("render", pa.string()),
        pa.field("model", pa.string()),
        pa.field("finished_at", pa.string()),
    ]
)

STATUSES = ("ok", "partial", "failed")


@dataclass
class FaceColumns:
    """Per-face arrays of one or more frames, in the order they will be written."""

    frame_index: np.ndarray  # (F,) int64
    timestamp_s: np.ndarray  # (F,) float64
    face_index: np.ndarray  # (F,) int32
    track_id: np.ndarray  # (F,) int64
    boxes: np.ndarray  # (F, 4) int32
    detected: np.ndarray  # (F,) bool
    confidence: np.ndarray  # (F,) float32
    keypoints: np.ndarray  # (F, 68, 2) float32
    keypoints_raw: np.ndarray  # (F, 68, 2) float32
    pose: np.ndarray  # (F, 3) float32 yaw, pitch, roll
    keypoint_scores: np.ndarray | None = None  # (F, 68) float32 in 0..1; None: NaN (no scores)

    def __post_init__(self) -> None:
        if self.keypoint_scores is None:
            self.keypoint_scores = np.full((len(self.frame_index), NUM_KEYPOINTS), np.nan, np.float32)

    @staticmethod
    def empty() -> FaceColumns:
        return FaceColumns(
            np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int32), np.zeros(0, np.int64),
            np.zeros((0, 4), np.int32), np.zeros(0, bool), np.zeros(0, np.float32),
            np.zeros((0, NUM_KEYPOINTS, 2), np.float32), np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
            np.zeros((0, 3), np.float32),
        )

    def __len__(self) -> int:
        return len(self.frame_index)

    @staticmethod
    def concat(parts: list[FaceColumns]) -> FaceColumns:
        parts = [p for p in parts if len(p)]
        if not parts:
            return FaceColumns.empty()
        return FaceColumns(*(np.concatenate([getattr(p, f) for p in parts]) for f in FaceColumns.__dataclass_fields__))


def _keypoint_array(kp: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(np.asarray(kp, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), KEYPOINT_VALUES)


def faces_table(video_id: str, video_path: str, cols: FaceColumns) -> pa.Table:
    """The rows of one video's faces as an Arrow table of FACE_SCHEMA."""
    n = len(cols)
    boxes = np.asarray(cols.boxes, dtype=np.int32).reshape(n, 4)
    pose = np.asarray(cols.pose, dtype=np.float32).reshape(n, 3)
    arrays = [
        pa.array([video_id] * n, pa.string()),
        pa.array([video_path] * n, pa.string()),
        pa.array(cols.frame_index, pa.int64()),
        pa.array(cols.timestamp_s, pa.float64()),
        pa.array(cols.face_index, pa.int32()),
        pa.array(cols.track_id, pa.int64()),
        *(pa.array(boxes[:, i], pa.int32()) for i in range(4)),
        pa.array(np.asarray(cols.detected, dtype=bool), pa.bool_()),
        pa.array(cols.confidence, pa.float32()),
        _keypoint_array(cols.keypoints),
        _keypoint_array(cols.keypoints_raw),
        *(pa.array(pose[:, i], pa.float32()) for i in range(3)),
        pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(cols.keypoint_scores, np.float32).reshape(-1), pa.float32()), NUM_KEYPOINTS),
    ]
    return pa.Table.from_arrays(arrays, schema=FACE_SCHEMA)


def columns_from_table(table: pa.Table) -> FaceColumns:
    """Back from Arrow to arrays (for stitching, smoothing and rendering)."""
    n = table.num_rows

    def kp(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, NUM_KEYPOINTS, 2)

    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    return FaceColumns(
        frame_index=col("frame_index").astype(np.int64),
        timestamp_s=col("timestamp_s").astype(np.float64),
        face_index=col("face_index").astype(np.int32),
        track_id=col("track_id").astype(np.int64),
        boxes=np.stack([col(c) for c in ("box_x", "box_y", "box_w", "box_h")], axis=1).astype(np.int32).reshape(n, 4),
        detected=col("detected").astype(bool),
        confidence=col("confidence").astype(np.float32),
        keypoints=kp("keypoints").astype(np.float32),
        keypoints_raw=kp("keypoints_raw").astype(np.float32),
        pose=np.stack([col(c) for c in ("yaw", "pitch", "roll")], axis=1).astype(np.float32).reshape(n, 3),
        keypoint_scores=(  # part files written before the column existed read as NaN
            table.column("keypoint_scores").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            .reshape(n, NUM_KEYPOINTS).astype(np.float32) if "keypoint_scores" in table.column_names else None),
    )


# ------------------------------------------------------------------------------------------
# where the output lives, and writes nobody sees half-done
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """An output folder on some filesystem (local disk, S3, GCS...)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def part_path(self, video_id: str) -> str:
        return self.path(f"part-{video_id}.parquet")

    def status_path(self, video_id: str) -> str:
        return self.path("_status", f"{video_id}.json")

    def segment_dir(self, video_id: str) -> str:
        return self.path("_segments", video_id)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def remove_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """All-or-nothing write: temp name + rename locally; one upload on object stores."""
        parent = posixpath.dirname(path)
        self.makedirs(parent)
        if self.is_local:
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, path)  # rename(2): atomic on one filesystem
            except BaseException:
                if self.exists(tmp):
                    self.fs.delete_file(tmp)
                raise
        else:
            with self.fs.open_output_stream(path) as f:  # object stores publish on completion
                f.write(data)

    def write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes())

    def read_table(self, path: str) -> pa.Table:
        with self.fs.open_input_file(path) as f:
            return pq.read_table(f)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())


def open_output(uri: str) -> Output:
    """Resolve a local path or filesystem URI; raises ValueError for a URI pyarrow cannot open."""
    if "://" in uri:
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ValueError(f"{uri}: cannot open this output location ({exc})") from exc
        return Output(fs, root.rstrip("/"), uri)
    import os

    root = os.path.abspath(uri)
    return Output(pafs.LocalFileSystem(), root.replace(os.sep, "/"), root)


def videos_table(records: list[dict]) -> pa.Table:
    """The per-video table from status records (missing keys become nulls)."""
    cols = {f.name: [r.get(f.name) for r in records] for f in VIDEO_SCHEMA}
    return pa.Table.from_pydict(cols, schema=VIDEO_SCHEMA)
