"""The Parquet schemas, and the Arrow and JSON forms of the annotate flow's typed records, in one place.

FACE_SCHEMA: one row per face per frame (``OUT/part-<video_id>.parquet``, and the segment files a
run writes on the way); VIDEO_SCHEMA: one row per input (``OUT/_videos.parquet``). The typed values
(:mod:`fkp_core.records`) become JSON or Arrow only here; where the files live and how they are
written all-or-nothing is :mod:`fkp_core.store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import pyarrow as pa

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.records import SegmentResult, VideoRecord

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


def videos_table(records: list[VideoRecord | dict]) -> pa.Table:
    """The per-video table from status records (or their JSON objects, whose missing keys become nulls)."""
    cols = {f.name: [r.get(f.name) if isinstance(r, dict) else getattr(r, f.name) for r in records] for f in VIDEO_SCHEMA}
    return pa.Table.from_pydict(cols, schema=VIDEO_SCHEMA)


# ------------------------------------------------------------------------------------------
# typed records <-> their JSON and Arrow forms (the only place they are made)
# ------------------------------------------------------------------------------------------

_RECORD_FIELDS = {f.name for f in fields(VideoRecord)}
_SEGMENT_FIELDS = {f.name for f in fields(SegmentResult)} - {"skipped"}
SEGMENT_STATS_KEY = b"fkp_stats"  # a segment file's SegmentResult, as JSON in its schema metadata


def record_to_json(record: VideoRecord) -> dict:
    """A status record as the JSON object of ``_status/<video_id>.json``."""
    return asdict(record)


def record_from_json(obj: dict) -> VideoRecord:
    """Back from JSON; keys an older or newer version wrote and this one lacks are ignored."""
    return VideoRecord(**{k: v for k, v in obj.items() if k in _RECORD_FIELDS})


def segment_table(video_id: str, video_path: str, result: SegmentResult, cols: FaceColumns) -> pa.Table:
    """A segment's rows with its result in the schema metadata (what a resumed run reads back)."""
    table = faces_table(video_id, video_path, cols)
    stats = {k: v for k, v in asdict(result).items() if k in _SEGMENT_FIELDS}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SEGMENT_STATS_KEY: json.dumps(stats).encode()})


def segment_result_from_schema(schema: pa.Schema) -> SegmentResult:
    """The SegmentResult a segment file carries (raises KeyError when it carries none)."""
    stats = json.loads((schema.metadata or {})[SEGMENT_STATS_KEY])
    return SegmentResult(**{k: v for k, v in stats.items() if k in _SEGMENT_FIELDS})
