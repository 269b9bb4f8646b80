"""The Parquet output in other layouts: OpenFace 2.x CSV, a plain wide CSV, JSON lines; streamed.

One file per video (``part-<video_id>.parquet`` -> ``DEST/<video_id>.csv`` or ``.jsonl``). A part
file is read record batch by record batch (``batch_rows`` rows, column chunks read through a
buffered stream, so never a whole row group's pages at once), each batch is formatted and written,
and the file is published whole at the end by the output folder's one all-or-nothing write
(:meth:`fkp_core.store.Output.open_atomic`), so a reader never sees half an export and memory does
not grow with the video.

OpenFace layout (what ``FeatureExtraction`` / ``FaceLandmarkVidMulti`` write with ``-pose -2Dfp``,
minus the columns fkp has no value for): ``frame, face_id, timestamp, confidence, success,
pose_Rx, pose_Ry, pose_Rz, x_0..x_67, y_0..y_67``, separated by a comma and a space, with
OpenFace's number formats (timestamp 3 decimals, confidence 2, rotations 3, landmarks 1).
``frame`` is 1-based (``frame_index + 1``), ``face_id`` is the track id, and the rotations are
OpenFace's: radians, R = Rx @ Ry @ Rz in the camera frame (x right, y down, z forward), so for
small angles pose_Rx ~ -pitch, pose_Ry ~ -yaw, pose_Rz ~ -roll of fkp's degrees (the exact
conversion goes through the rotation matrix: fkp composes its angles in the other order).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fkp_core.constants import MIN_FACE_CONFIDENCE, NUM_KEYPOINTS
from fkp_core.store import Output

FORMATS = ("openface", "csv", "jsonl")
SUFFIXES = {"openface": ".csv", "csv": ".csv", "jsonl": ".jsonl"}
DEFAULT_BATCH_ROWS = 8192
READ_BUFFER_BYTES = 1 << 20  # column chunks are read through a buffer of this size, not whole
REQUIRED_COLUMNS = ("video_id", "frame_index", "timestamp_s", "track_id", "confidence", "keypoints", "yaw", "pitch", "roll")

OPENFACE_COLUMNS = (
    ["frame", "face_id", "timestamp", "confidence", "success", "pose_Rx", "pose_Ry", "pose_Rz"]
    + [f"x_{i}" for i in range(NUM_KEYPOINTS)] + [f"y_{i}" for i in range(NUM_KEYPOINTS)]
)
_OPENFACE_FORMATS = ["%d", "%d", "%.3f", "%.2f", "%d", "%.3f", "%.3f", "%.3f"] + ["%.1f"] * (2 * NUM_KEYPOINTS)
_OPENFACE_LINE = ", ".join(_OPENFACE_FORMATS)


class NotAnOutputError(ValueError):
    """The folder holds no fkp output (or a part file is not one of fkp's)."""


@dataclass(frozen=True)
class PartFile:
    video_id: str
    path: str


@dataclass(frozen=True)
class ExportResult:
    video_id: str
    path: str  # the file written (a path on the destination's filesystem)
    rows: int
    batches: int


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def list_parts(out: Output) -> list[PartFile]:
    """The part files of an fkp output folder, by video id; NotAnOutputError when it is not one.

    An fkp output has ``_videos.parquet`` or ``_status/*.json`` (written for every finished input).
    """
    info = out.fs.get_file_info(out.root)
    if info.type != pafs.FileType.Directory:
        raise NotAnOutputError(f"{out.uri}: no such folder")
    status = [p for p in out.listdir(out.path("_status")) if p.endswith(".json")]
    if not out.exists(out.path("_videos.parquet")) and not status:
        raise NotAnOutputError(f"{out.uri}: not an fkp output folder (no _videos.parquet or _status/)")
    parts = []
    for p in out.listdir(out.root):
        name = posixpath.basename(p)
        if name.startswith("part-") and name.endswith(".parquet"):
            parts.append(PartFile(name[len("part-") : -len(".parquet")], p))
    return parts


def _parquet_file(f, path: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise NotAnOutputError(f"{path}: not a Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise NotAnOutputError(f"{path}: not an fkp part file (no column {', '.join(missing)})")
    return pf


def iter_batches(out: Output, path: str, batch_rows: int = DEFAULT_BATCH_ROWS,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_rows`` rows of one part file, read as they are consumed."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    with out.fs.open_input_file(path) as f:
        yield from _parquet_file(f, path).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def keypoint_array(batch: pa.RecordBatch, name: str = "keypoints") -> np.ndarray:
    """(N, 68, 2) float32 keypoints of a batch."""
    col = batch.column(name)
    flat = col.flatten() if isinstance(col, pa.FixedSizeListArray) else pa.array(col).flatten()
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(batch), NUM_KEYPOINTS, 2)


def _floats(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


# ------------------------------------------------------------------------------------------
# OpenFace
# ------------------------------------------------------------------------------------------


def openface_rotation(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(N, 3) OpenFace (pose_Rx, pose_Ry, pose_Rz) in radians from fkp's (yaw, pitch, roll) in degrees.

    fkp: model-to-camera R = Rz(-roll) @ Ry(-yaw) @ Rx(-pitch) (fkp_core.pose); OpenFace:
    R = Rx(a) @ Ry(b) @ Rz(c), both in the camera frame x right, y down, z forward and with the
    same model frame. So a = atan2(-R12, R22), b = asin(R02), c = atan2(-R01, R00). NaN stays NaN.
    """
    y, p, r = (-np.radians(np.asarray(a, np.float64)) for a in (yaw, pitch, roll))
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    # entries of Rz(r) @ Ry(y) @ Rx(p) that the decomposition needs
    r00 = cr * cy
    r01 = cr * sy * sp - sr * cp
    r02 = cr * sy * cp + sr * sp
    r12 = sr * sy * cp - cr * sp
    r22 = cy * cp
    a = np.arctan2(-r12, r22)
    b = np.arcsin(np.clip(r02, -1.0, 1.0))
    c = np.arctan2(-r01, r00)
    return np.stack([a, b, c], axis=1)


def openface_header() -> str:
    return ", ".join(OPENFACE_COLUMNS) + "\n"


def openface_rows(batch: pa.RecordBatch) -> np.ndarray:
    """(N, 8 + 136) float64: the values of the OpenFace columns, in order."""
    n = len(batch)
    kp = keypoint_array(batch)
    conf = _floats(batch, "confidence")
    # OpenFace's success: the fit is one to use (all points found and a confidence the job would keep by default)
    success = (np.isfinite(kp).all(axis=(1, 2)) & (conf >= MIN_FACE_CONFIDENCE)).astype(np.float64)
    rot = openface_rotation(_floats(batch, "yaw"), _floats(batch, "pitch"), _floats(batch, "roll"))
    cols = np.empty((n, 8 + 2 * NUM_KEYPOINTS), np.float64)
    cols[:, 0] = _floats(batch, "frame_index") + 1
    cols[:, 1] = _floats(batch, "track_id")
    cols[:, 2] = _floats(batch, "timestamp_s")
    cols[:, 3] = conf
    cols[:, 4] = success
    cols[:, 5:8] = rot
    cols[:, 8 : 8 + NUM_KEYPOINTS] = kp[:, :, 0]
    cols[:, 8 + NUM_KEYPOINTS :] = kp[:, :, 1]
    return cols


def openface_text(batch: pa.RecordBatch) -> str:
    """The batch's rows as OpenFace CSV lines (NaN written as ``NaN``, which pandas and R read as numbers)."""
    rows = openface_rows(batch).tolist()
    text = "".join(_OPENFACE_LINE % tuple(r) + "\n" for r in rows)
    return text.replace("nan", "NaN")


# ------------------------------------------------------------------------------------------
# plain wide CSV and JSON lines
# ------------------------------------------------------------------------------------------


def wide_batch(batch: pa.RecordBatch, raw: bool = False) -> pa.RecordBatch:
    """Scalar columns as they are; ``keypoints`` as x_0..x_67, y_0..y_67 (``keypoints_raw`` as raw_x_*,
    raw_y_* with ``raw``, else dropped); any other fixed-size list column ``c`` as c_0..c_{n-1}."""
    names, arrays = [], []
    for field, col in zip(batch.schema, batch.columns):
        t = field.type
        if field.name in ("keypoints", "keypoints_raw"):
            if field.name == "keypoints_raw" and not raw:
                continue
            prefix = "" if field.name == "keypoints" else "raw_"
            kp = keypoint_array(batch, field.name)
            for axis, letter in ((0, "x"), (1, "y")):
                for i in range(NUM_KEYPOINTS):
                    names.append(f"{prefix}{letter}_{i}")
                    arrays.append(pa.array(kp[:, i, axis], pa.float32()))
        elif pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
            width = t.list_size if pa.types.is_fixed_size_list(t) else None
            values = col.flatten().to_numpy(zero_copy_only=False)
            if width is None:  # variable lists cannot be columns: one JSON text per row
                names.append(field.name)
                arrays.append(pa.array([json.dumps(v) for v in col.to_pylist()], pa.string()))
                continue
            values = values.reshape(len(batch), width)
            for i in range(width):
                names.append(f"{field.name}_{i}")
                arrays.append(pa.array(values[:, i], t.value_type))
        else:
            names.append(field.name)
            arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _json_value(v):
    if isinstance(v, float):
        return None if not math.isfinite(v) else v
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def jsonl_text(batch: pa.RecordBatch, raw: bool = False) -> str:
    """One JSON object per row: scalar columns, ``keypoints`` as 68 [x, y] pairs (``keypoints_raw`` too with
    ``raw``); float32 values rounded to 4 decimals (1e-4 pixel or degree), NaN as null."""
    cols: dict[str, list] = {}
    for field, col in zip(batch.schema, batch.columns):
        t = field.type
        if field.name == "keypoints_raw" and not raw:
            continue
        if field.name in ("keypoints", "keypoints_raw"):
            cols[field.name] = np.round(keypoint_array(batch, field.name).astype(np.float64), 4).tolist()
        elif pa.types.is_float32(t):
            cols[field.name] = np.round(col.to_numpy(zero_copy_only=False).astype(np.float64), 4).tolist()
        elif pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type):
            vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(batch), t.list_size)
            cols[field.name] = np.round(vals, 4).tolist()
        else:
            cols[field.name] = col.to_pylist()
    names = list(cols)
    clean = {n: not _has_nonfinite(cols[n]) for n in names}
    encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
    lines = []
    for i in range(len(batch)):
        row = {n: (cols[n][i] if clean[n] else _json_value(cols[n][i])) for n in names}
        lines.append(encode(row))
    return "".join(line + "\n" for line in lines)


def _has_nonfinite(values: list) -> bool:
    """Whether a column (a list of scalars or nested lists) holds a NaN or infinity."""
    if not values or not isinstance(values[0], (float, list)):
        return any(isinstance(v, float) and not math.isfinite(v) for v in values)
    try:
        return not np.isfinite(np.asarray(values, dtype=np.float64)).all()
    except (TypeError, ValueError):  # ragged or mixed: check value by value
        return any(_json_value(v) != v for v in values)


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def export_part(out: Output, part: PartFile, fmt: str, dest: Output, batch_rows: int = DEFAULT_BATCH_ROWS,
                raw: bool = False, on_batch: Callable[[pa.RecordBatch], None] | None = None) -> ExportResult:
    """Write one video's rows to ``dest/<video_id><suffix>`` in ``fmt``; ``on_batch`` sees every batch read."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    target = dest.path(part.video_id + SUFFIXES[fmt])
    rows = count = 0
    with out.fs.open_input_file(part.path) as f:
        pf = _parquet_file(f, part.path)  # checked before anything is written
        with dest.open_atomic(target) as stream:  # the output folder's one all-or-nothing write
            csv_writer = None
            if fmt == "openface":
                stream.write(openface_header().encode())
            elif fmt == "csv":
                empty = wide_batch(pa.RecordBatch.from_pylist([], schema=pf.schema_arrow), raw)
                csv_writer = pacsv.CSVWriter(stream, empty.schema, write_options=pacsv.WriteOptions(quoting_style="needed"))
            for batch in pf.iter_batches(batch_size=batch_rows, use_threads=False):
                if on_batch is not None:
                    on_batch(batch)
                rows += len(batch)
                count += 1
                if fmt == "openface":
                    stream.write(openface_text(batch).encode())
                elif fmt == "jsonl":
                    stream.write(jsonl_text(batch, raw).encode())
                else:
                    csv_writer.write_batch(wide_batch(batch, raw))
            if csv_writer is not None:
                csv_writer.close()
    return ExportResult(part.video_id, target, rows, count)
