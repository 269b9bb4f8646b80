"""Smoothed keypoints, head pose and global track ids: per segment in parallel, then joined per video.

Smoothing and pose are most of a video's post-processing (~0.25 ms per face), so each segment
task does them for its own rows (:func:`postprocess_segment`), each of its tracks smoothed from
its first row there. Joining a video's segments (:func:`postprocess_video`) stitches tracks
across segment boundaries and redoes only the rows a boundary touched: a track that continues
from an earlier segment was smoothed from a cold start there, and the filter forgets its start
geometrically, so its rows after :func:`~fkp_core.smoothing.OneEuroConfig.settle_seconds` are
already what smoothing the whole track in one pass gives (to ~1e-4 of the start's error, a few
thousandths of a pixel). The rows before are smoothed again, starting that long before the
boundary, and posed again. The serial part per video is thus a few seconds of frames per
boundary rather than the whole video: a long video on a large cluster is not held up by one
task that smooths every frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fkp_core.pose import head_pose
from fkp_core.smoothing import OneEuroConfig, smooth_track
from fkp_core.tables import FaceColumns
from fkp_core.tracking import SegmentTracks, TrackerConfig, global_track_ids, stitch_segments


def postprocess_segment(
    cols: FaceColumns, frame_size: tuple[int, int], smooth: bool = True, smoothing: OneEuroConfig | None = None
) -> FaceColumns:
    """Smooth each track of one segment's rows (in frame order) from its first row there, and pose every face."""
    keypoints = cols.keypoints_raw.copy()
    if smooth and len(cols):
        for tid in np.unique(cols.track_id):
            rows = np.flatnonzero(cols.track_id == tid)  # rows are in frame order
            keypoints[rows] = smooth_track(cols.timestamp_s[rows], cols.keypoints_raw[rows], smoothing)
    cols.keypoints = keypoints.astype(np.float32)
    cols.pose = head_pose(cols.keypoints, frame_size) if len(cols) else np.zeros((0, 3), np.float32)
    return cols


def postprocess_video(
    segments: Sequence[FaceColumns],
    stats: Sequence[dict],
    frame_size: tuple[int, int],
    smooth: bool = True,
    smoothing: OneEuroConfig | None = None,
    tracker: TrackerConfig | None = None,
) -> FaceColumns:
    """Join a video's segments (each through :func:`postprocess_segment`, in any order, with their stats).

    Rows come out in frame order with global track ids; a track's keypoints are as if the whole
    track had been smoothed in one pass (see the module docstring).
    """
    cfg = smoothing or OneEuroConfig()
    tracks = []
    for cols, st in zip(segments, stats):
        start = int(st["start"])
        end = int(st["end"]) if st.get("end") is not None else (int(cols.frame_index.max()) + 1 if len(cols) else start)
        end = max(end, int(cols.frame_index.max()) + 1 if len(cols) else start)
        tracks.append(SegmentTracks(
            start=start, end=end, frame_index=cols.frame_index, track_id=cols.track_id, boxes=cols.boxes,
            keypoints=cols.keypoints_raw, cuts=np.asarray(st.get("cuts", []), np.int64),
            head_signature=np.asarray(st.get("head_signature", []), np.float32),
            tail_signature=np.asarray(st.get("tail_signature", []), np.float32),
        ))
    mappings = stitch_segments(tracks, tracker)
    pieces = []  # per row: which (segment, local track) smoothed it, as one int
    offset = 0
    for cols, seg, mapping in zip(segments, tracks, mappings):
        local = np.unique(cols.track_id, return_inverse=True)[1].reshape(-1) if len(cols) else np.zeros(0, np.int64)
        pieces.append(offset + local)
        offset += int(local.max()) + 1 if len(local) else 0
        cols.track_id = global_track_ids(seg, mapping)
    merged = FaceColumns.concat(list(segments))
    piece = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    order = np.lexsort((merged.face_index, merged.frame_index))
    merged = FaceColumns(*(getattr(merged, f)[order] for f in FaceColumns.__dataclass_fields__))
    piece = piece[order]
    if not smooth:
        return merged
    for tid in np.unique(merged.track_id):
        rows = np.flatnonzero(merged.track_id == tid)  # in frame order
        starts = np.flatnonzero(np.diff(piece[rows]) != 0) + 1  # where a later segment's piece of the track begins
        if len(starts):
            _resmooth_boundaries(merged, rows, starts, frame_size, cfg)
    return merged


def _resmooth_boundaries(merged: FaceColumns, rows: np.ndarray, starts: np.ndarray, frame_size: tuple[int, int],
                         cfg: OneEuroConfig) -> None:
    """Smooth and pose again the rows of one track that a later piece's cold start left unsettled."""
    times = merged.timestamp_s[rows]
    settle = cfg.settle_seconds(float(np.median(np.diff(times))) if len(times) > 1 else 1.0)
    ends = np.append(starts[1:], len(rows))
    for b, next_piece in zip(starts, ends):
        end = min(int(next_piece), b + int(np.searchsorted(times[b:], times[b] + settle, side="left")))
        begin = int(np.searchsorted(times, times[b] - settle, side="left"))  # a cold start this long before b settles by b
        redo = rows[b:end]
        out = smooth_track(times[begin:end], merged.keypoints_raw[rows[begin:end]], cfg)
        merged.keypoints[redo] = out[b - begin:]
        merged.pose[redo] = head_pose(merged.keypoints[redo], frame_size)
