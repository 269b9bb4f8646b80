"""A video's segments -> its final rows: global track ids, smoothed keypoints, head pose.

Runs once per video after all its segments are written, so that tracks are stitched across
segment boundaries and each track is smoothed over its whole length (a segment alone would
restart the filter at every boundary).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fkp_core.pose import head_pose
from fkp_core.smoothing import OneEuroConfig, smooth_track
from fkp_core.tables import FaceColumns
from fkp_core.tracking import SegmentTracks, TrackerConfig, global_track_ids, stitch_segments


def postprocess_video(
    segments: Sequence[FaceColumns],
    stats: Sequence[dict],
    frame_size: tuple[int, int],
    smooth: bool = True,
    smoothing: OneEuroConfig | None = None,
    tracker: TrackerConfig | None = None,
) -> FaceColumns:
    """Stitch, smooth and pose the rows of a video's segments (in frame order, with their stats)."""
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
    for cols, seg, mapping in zip(segments, tracks, mappings):
        cols.track_id = global_track_ids(seg, mapping)
    merged = FaceColumns.concat(list(segments))
    order = np.lexsort((merged.face_index, merged.frame_index))
    merged = FaceColumns(*(getattr(merged, f)[order] for f in FaceColumns.__dataclass_fields__))
    keypoints = merged.keypoints_raw.copy()
    if smooth and len(merged):
        for tid in np.unique(merged.track_id):
            rows = np.flatnonzero(merged.track_id == tid)  # already in frame order
            keypoints[rows] = smooth_track(merged.timestamp_s[rows], merged.keypoints_raw[rows], smoothing)
    merged.keypoints = keypoints.astype(np.float32)
    merged.pose = head_pose(merged.keypoints, frame_size) if len(merged) else np.zeros((0, 3), np.float32)
    return merged
