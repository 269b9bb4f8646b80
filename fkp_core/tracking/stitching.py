"""Stitching segments: the tracks that cross a segment boundary linked, and global track ids.

The video job cuts a video into segments of consecutive frames that run in parallel; each gives
its faces local track ids (:class:`~fkp_core.tracking.online.Tracker`). :func:`stitch_segments`
links the tracks that cross a segment boundary, with the tracker's own matching rule (so a face
keeps one id across boundaries, gaps and short segments included), never across a scene cut, and
gives every track a *global* id, dense (0..T-1) and ordered by first appearance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.tracking.cuts import SCENE_CUT_THRESHOLD, cut_score
from fkp_core.tracking.matching import TrackerConfig, _match, _shift_box, _velocity, match_cost


def _empty_int() -> np.ndarray:
    return np.zeros(0, np.int64)


def _empty_float() -> np.ndarray:
    return np.zeros(0, np.float32)


@dataclass(frozen=True)
class SegmentTracks:
    """What one segment task hands the driver for stitching: its tracker output as numpy arrays.

    * ``start``, ``end``: the segment's frames, [start, end).
    * ``frame_index`` (R,) int64, ``track_id`` (R,) int64 (the local ids of its :class:`Tracker`),
      ``boxes`` (R, 4), ``keypoints`` (R, 68, 2): one row per face per frame, all the segment's
      rows (global ids are ordered by every track's first frame), in any fixed order (row order
      only breaks ties between tracks that first appear in the same frame).
    * ``cuts`` (C,) int64: frames f that start a new shot (the task called ``Tracker.reset()``
      before frame f). A task that also decoded frame ``start - 1`` and found a cut there puts
      ``start`` in it.
    * ``head_signature`` / ``tail_signature``: :func:`frame_signature` of frames ``start`` and
      ``end - 1`` (empty when unknown): the driver compares segment k's tail with segment k+1's
      head to find a cut exactly at the boundary, which neither task can see alone.
    """

    start: int
    end: int
    frame_index: np.ndarray = field(default_factory=_empty_int)
    track_id: np.ndarray = field(default_factory=_empty_int)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, NUM_KEYPOINTS, 2), np.float32))
    cuts: np.ndarray = field(default_factory=_empty_int)
    head_signature: np.ndarray = field(default_factory=_empty_float)
    tail_signature: np.ndarray = field(default_factory=_empty_float)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "frame_index", np.asarray(self.frame_index, np.int64).reshape(-1))
        set_(self, "track_id", np.asarray(self.track_id, np.int64).reshape(-1))
        set_(self, "boxes", np.asarray(self.boxes, np.float64).reshape(-1, 4))
        set_(self, "keypoints", np.asarray(self.keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2))
        set_(self, "cuts", np.asarray(self.cuts, np.int64).reshape(-1))
        set_(self, "head_signature", np.asarray(self.head_signature, np.float32))
        set_(self, "tail_signature", np.asarray(self.tail_signature, np.float32))
        r = len(self.frame_index)
        if not (len(self.track_id) == len(self.boxes) == len(self.keypoints) == r):
            raise ValueError("frame_index, track_id, boxes and keypoints must have the same number of rows")
        if self.end < self.start:
            raise ValueError(f"segment end {self.end} is before its start {self.start}")
        if r and (self.frame_index.min() < self.start or self.frame_index.max() >= self.end):
            raise ValueError(f"rows outside the segment's frames [{self.start}, {self.end})")


@dataclass
class _TrackSummary:
    segment: int  # position in start order
    local_id: int
    first_row: int
    first_frame: int
    first_box: np.ndarray
    first_keypoints: np.ndarray
    last_frame: int
    last_box: np.ndarray
    last_keypoints: np.ndarray
    velocity: np.ndarray  # (68, 2) per frame, over the track's last observations


def _summaries(seg: SegmentTracks, position: int, window: int) -> list[_TrackSummary]:
    out = []
    for local in dict.fromkeys(seg.track_id.tolist()):  # in order of first row
        rows = np.nonzero(seg.track_id == local)[0]
        rows = rows[np.argsort(seg.frame_index[rows], kind="stable")]
        first, last = rows[0], rows[-1]
        tail = rows[-(window + 1) :]
        out.append(
            _TrackSummary(
                position,
                int(local),
                int(first),
                int(seg.frame_index[first]),
                seg.boxes[first],
                seg.keypoints[first],
                int(seg.frame_index[last]),
                seg.boxes[last],
                seg.keypoints[last],
                _velocity(seg.frame_index[tail].tolist(), list(seg.keypoints[tail])),
            )
        )
    return out


def stitch_segments(
    segments: Sequence[SegmentTracks],
    config: TrackerConfig | None = None,
    cut_threshold: float = SCENE_CUT_THRESHOLD,
) -> list[dict[int, int]]:
    """Global track ids for every segment's local ids: one {local id: global id} dict per segment, in input order.

    A track ending in an earlier segment continues as a track starting in a later one when the
    frames between them are at most ``max_gap``, no scene cut lies between them (a cut in either
    segment's ``cuts``, or at the boundary by their signatures), and the two match under the
    tracker's cost (constant-velocity prediction of the earlier track to the later one's first
    frame, one-to-one, optimal). This is the rule the :class:`Tracker` applies inside a segment,
    so a track crossing a boundary keeps one id. Global ids are 0..T-1 by first appearance (first
    frame, then the segment's row order). Segments must not overlap; input order is free.
    """
    cfg = config or TrackerConfig()
    order, segs = _in_start_order(segments)
    cut_list = _all_cuts(segs, cut_threshold)
    summaries = [_summaries(s, k, cfg.velocity_window) for k, s in enumerate(segs)]
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    open_tails: list[_TrackSummary] = []  # track ends not yet continued, oldest segment first
    for k, heads_all in enumerate(summaries):
        start = segs[k].start
        open_tails = [t for t in open_tails if start - t.last_frame - 1 <= cfg.max_gap]
        heads = [h for h in heads_all if h.first_frame - start <= cfg.max_gap]
        linked = set()
        for ti, hi in _link(open_tails, heads, cut_list, cfg):
            t, h = open_tails[ti], heads[hi]
            parent[(h.segment, h.local_id)] = _root(parent, (t.segment, t.local_id))
            linked.add(ti)
        open_tails = [t for i, t in enumerate(open_tails) if i not in linked] + heads_all
    by_position = _global_ids(summaries, parent)
    result: list[dict[int, int]] = [{} for _ in segments]
    for position, original in enumerate(order):
        result[original] = by_position[position]
    return result


def _in_start_order(segments: Sequence[SegmentTracks]) -> tuple[list[int], list[SegmentTracks]]:
    order = sorted(range(len(segments)), key=lambda i: (segments[i].start, segments[i].end))
    segs = [segments[i] for i in order]
    for a, b in zip(segs, segs[1:]):
        if b.start < a.end:
            raise ValueError(f"segments overlap: [{a.start}, {a.end}) and [{b.start}, {b.end})")
    return order, segs


def _all_cuts(segs: list[SegmentTracks], cut_threshold: float) -> np.ndarray:
    """Every segment's cuts, and the cuts at boundaries that the signatures on either side show, sorted."""
    cuts: set[int] = set()
    for s in segs:
        cuts.update(int(c) for c in s.cuts)
    for a, b in zip(segs, segs[1:]):
        if a.tail_signature.size and b.head_signature.size and cut_score(a.tail_signature, b.head_signature) > cut_threshold:
            cuts.add(b.start)
    return np.array(sorted(cuts), np.int64)


def _cut_between(cut_list: np.ndarray, last: int, first: int) -> bool:
    i = np.searchsorted(cut_list, last, side="right")  # first cut > last
    return bool(i < len(cut_list) and cut_list[i] <= first)


def _link(tails: list[_TrackSummary], heads: list[_TrackSummary], cut_list: np.ndarray, cfg: TrackerConfig) -> list[tuple[int, int]]:
    """Optimal (tail, head) pairs: each tail predicted to its head's first frame, scored as the tracker does."""
    cost = np.zeros((len(tails), len(heads)))
    feasible = np.zeros_like(cost, bool)
    for ti, t in enumerate(tails):
        for hi, h in enumerate(heads):
            missed = h.first_frame - t.last_frame - 1
            if missed > cfg.max_gap or _cut_between(cut_list, t.last_frame, h.first_frame):
                continue
            kp = t.last_keypoints + t.velocity * (h.first_frame - t.last_frame)
            box = _shift_box(t.last_box, t.last_keypoints, kp)
            c, f = match_cost(box[None], kp[None], h.first_box[None], h.first_keypoints[None], np.array([missed]), cfg)
            cost[ti, hi], feasible[ti, hi] = c[0, 0], f[0, 0]
    return _match(cost, feasible)


def _root(parent: dict, node: tuple[int, int]) -> tuple[int, int]:
    while parent.get(node, node) != node:
        node = parent[node]
    return node


def _global_ids(summaries: list[list[_TrackSummary]], parent: dict) -> list[dict[int, int]]:
    """{local id: global id} per segment (in start order): 0..T-1 by first frame, then segment, then row."""
    first_seen: dict[tuple[int, int], tuple[int, int, int]] = {}
    for seg_summaries in summaries:
        for s in seg_summaries:
            r = _root(parent, (s.segment, s.local_id))
            key = (s.first_frame, s.segment, s.first_row)
            if r not in first_seen or key < first_seen[r]:
                first_seen[r] = key
    global_of_root = {r: g for g, r in enumerate(sorted(first_seen, key=first_seen.__getitem__))}
    return [{s.local_id: global_of_root[_root(parent, (s.segment, s.local_id))] for s in seg} for seg in summaries]


def global_track_ids(segment: SegmentTracks, mapping: dict[int, int]) -> np.ndarray:
    """The segment's rows relabelled with global ids, (R,) int64 (``mapping`` from :func:`stitch_segments`)."""
    return np.array([mapping[int(t)] for t in segment.track_id], np.int64)
