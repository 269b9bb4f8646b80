"""Faces linked across frames into tracks: one concept a module.

* :mod:`~fkp_core.tracking.matching`: the matching cost and optimal assignment, shared by both below;
* :mod:`~fkp_core.tracking.online`: the :class:`Tracker`, local track ids frame by frame inside a segment;
* :mod:`~fkp_core.tracking.cuts`: scene cuts from frame signatures;
* :mod:`~fkp_core.tracking.consistency`: the fast path's "is the fit still on the face" score;
* :mod:`~fkp_core.tracking.stitching`: tracks linked across segment boundaries, global ids.

The public names of each are importable from ``fkp_core.tracking``.
"""

from fkp_core.tracking.consistency import (
    REDETECT_BELOW,
    ConsistencyConfig,
    align_similarity,
    crop_box_from_keypoints,
    keypoint_consistency,
)
from fkp_core.tracking.cuts import (
    CUT_LAYOUT_DISTANCE,
    CUT_TONE_DISTANCE,
    SCENE_CUT_THRESHOLD,
    SIGNATURE_LENGTH,
    cut_score,
    frame_signature,
)
from fkp_core.tracking.matching import (
    DEFAULT_GAP_WIDENING,
    DEFAULT_IOU_WEIGHT,
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_GAP,
    DEFAULT_MIN_IOU,
    VELOCITY_WINDOW,
    TrackerConfig,
    face_size,
    linear_assignment,
    match_cost,
)
from fkp_core.tracking.online import FollowedFaces, Tracker
from fkp_core.tracking.stitching import SegmentTracks, global_track_ids, stitch_segments

__all__ = [
    "CUT_LAYOUT_DISTANCE", "CUT_TONE_DISTANCE", "DEFAULT_GAP_WIDENING", "DEFAULT_IOU_WEIGHT", "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MAX_GAP", "DEFAULT_MIN_IOU", "REDETECT_BELOW", "SCENE_CUT_THRESHOLD", "SIGNATURE_LENGTH", "VELOCITY_WINDOW",
    "ConsistencyConfig", "FollowedFaces", "SegmentTracks", "Tracker", "TrackerConfig", "align_similarity", "crop_box_from_keypoints",
    "cut_score", "face_size", "frame_signature", "global_track_ids", "keypoint_consistency", "linear_assignment",
    "match_cost", "stitch_segments",
]
