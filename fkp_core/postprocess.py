"""Smoothed keypoints, head pose and global track ids: per segment in parallel, then joined per video.

Smoothing and pose are most of a video's post-processing (~0.25 ms per face), so each segment
task does them for its own rows (:func:`postprocess_segment`), each of its tracks smoothed from
its first row there. Joining a video's segments (:func:`stitch_stream`, one segment in memory at
a time, whether they come from files or from a list: :func:`postprocess_video`) stitches tracks
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

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fkp_core.pose import head_pose
from fkp_core.records import SegmentResult
from fkp_core.smoothing import OneEuroConfig, smooth_track
from fkp_core.tables import FaceColumns
from fkp_core.tracking import SegmentTracks, TrackerConfig, stitch_segments


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


def segment_tracks(cols: FaceColumns, result: SegmentResult, keep: np.ndarray | None = None) -> SegmentTracks:
    """What stitching needs of a segment (``keep``: only these rows, in their order)."""
    start = int(result.start)
    last = int(cols.frame_index.max()) + 1 if len(cols) else start
    end = max(int(result.end) if result.end is not None else last, last)
    rows = slice(None) if keep is None else keep
    return SegmentTracks(
        start=start, end=end, frame_index=cols.frame_index[rows], track_id=cols.track_id[rows], boxes=cols.boxes[rows],
        keypoints=cols.keypoints_raw[rows], cuts=np.asarray(result.cuts, np.int64),
        head_signature=np.asarray(result.head_signature, np.float32),
        tail_signature=np.asarray(result.tail_signature, np.float32),
    )


@dataclass
class _TrackSummary:
    """What the second pass needs of one local track: its time steps (a histogram: few distinct values), ends."""

    steps: Counter
    first_time: float
    last_time: float
    rows: int


@dataclass
class _Carry:
    """A global track's latest raw rows, as far back as a boundary in a later segment can reach."""

    times: np.ndarray
    raw: np.ndarray


def _summary_rows(cols: FaceColumns, window: int) -> tuple[np.ndarray, dict[int, _TrackSummary]]:
    """The rows stitching reads (each track's first and last ``window + 1``, in row order) and per-track summaries."""
    keep, summaries = [], {}
    for tid in np.unique(cols.track_id):
        rows = np.flatnonzero(cols.track_id == tid)
        rows = rows[np.argsort(cols.frame_index[rows], kind="stable")]
        keep += [rows[:1], rows[-(window + 1):]]
        times = cols.timestamp_s[rows]
        summaries[int(tid)] = _TrackSummary(Counter(np.diff(times).tolist()), float(times[0]), float(times[-1]), len(rows))
    keep = np.unique(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    return keep, summaries


def _median(steps: Counter) -> float:
    """np.median of the values a histogram counts."""
    values = sorted(steps)
    n = sum(steps.values())
    cum = np.cumsum([steps[v] for v in values])
    lo, hi = values[int(np.searchsorted(cum, (n - 1) // 2, side="right"))], values[int(np.searchsorted(cum, n // 2, side="right"))]
    return (lo + hi) / 2


def _settle_by_track(summaries: list[dict[int, _TrackSummary]], mappings: list[dict[int, int]], cfg: OneEuroConfig):
    """-> ({global id: settle seconds of the whole track}, {global id: index of the last segment it has rows in})."""
    steps: dict[int, Counter] = {}
    last_time: dict[int, float] = {}
    count: dict[int, int] = {}
    last_segment: dict[int, int] = {}
    for k, (seg, mapping) in enumerate(zip(summaries, mappings)):
        for local, s in seg.items():
            g = mapping[local]
            acc = steps.setdefault(g, Counter())
            acc.update(s.steps)
            if g in last_time:
                acc[s.first_time - last_time[g]] += 1  # the step across the boundary
            last_time[g], count[g], last_segment[g] = s.last_time, count.get(g, 0) + s.rows, k
    settle = {g: cfg.settle_seconds(_median(steps[g]) if count[g] > 1 else 1.0) for g in steps}
    return settle, last_segment


def _resmooth_piece(cols: FaceColumns, rows: np.ndarray, carry: _Carry, settle: float, frame_size, cfg: OneEuroConfig) -> None:
    """The rows of one track's piece that its cold start left unsettled, smoothed again from the carried rows."""
    times = np.concatenate([carry.times, cols.timestamp_s[rows]])
    raw = np.concatenate([carry.raw, cols.keypoints_raw[rows]])
    b = len(carry.times)
    end = b + int(np.searchsorted(times[b:], times[b] + settle, side="left"))
    begin = int(np.searchsorted(times, times[b] - settle, side="left"))
    redo = rows[: end - b]
    cols.keypoints[redo] = smooth_track(times[begin:end], raw[begin:end], cfg)[b - begin:]
    cols.pose[redo] = head_pose(cols.keypoints[redo], frame_size)


def stitch_stream(load: Callable[[int], FaceColumns], results: Sequence[SegmentResult], frame_size: tuple[int, int],
                  smooth: bool = True, smoothing: OneEuroConfig | None = None,
                  tracker: TrackerConfig | None = None) -> Iterator[FaceColumns]:
    """A video's segments joined (each through :func:`postprocess_segment`), yielded segment by segment in frame
    order with global track ids, a track's keypoints as if the whole track had been smoothed in one pass.

    ``load(k)`` gives segment k's rows (``results`` in frame order); it is called twice per segment and
    may hand out the same object both times (its track ids are relabelled in place).
    The first pass keeps per-track summaries only (the rows stitching reads: each track's first and
    last few; its time steps as a histogram); the second relabels, smooths again next to boundaries
    from a carry of each continuing track's last ``settle`` seconds of raw rows, and yields.
    """
    cfg = smoothing or OneEuroConfig()
    window = (tracker or TrackerConfig()).velocity_window
    tracks, summaries = [], []
    for k, res in enumerate(results):
        cols = load(k)
        keep, summary = _summary_rows(cols, window)
        tracks.append(segment_tracks(cols, res, keep))
        summaries.append(summary)
        del cols
    mappings = stitch_segments(tracks, tracker)
    settle, last_segment = _settle_by_track(summaries, mappings, cfg)
    carries: dict[int, _Carry] = {}
    for k, mapping in enumerate(mappings):
        cols = load(k)
        cols.track_id = np.array([mapping[int(t)] for t in cols.track_id], np.int64)
        order = np.lexsort((cols.face_index, cols.frame_index))
        cols = FaceColumns(*(getattr(cols, f)[order] for f in FaceColumns.__dataclass_fields__))
        for g in np.unique(cols.track_id).tolist() if smooth else []:
            rows = np.flatnonzero(cols.track_id == g)
            if g in carries:
                _resmooth_piece(cols, rows, carries[g], settle[g], frame_size, cfg)
            times = np.concatenate([carries[g].times, cols.timestamp_s[rows]]) if g in carries else cols.timestamp_s[rows]
            raw = np.concatenate([carries[g].raw, cols.keypoints_raw[rows]]) if g in carries else cols.keypoints_raw[rows]
            held = times >= times[-1] - settle[g]
            carries[g] = _Carry(times[held], raw[held])
        for g in [g for g in carries if last_segment[g] <= k]:  # tracks that never come back
            del carries[g]
        yield cols


def postprocess_video(
    segments: Sequence[FaceColumns],
    results: Sequence[SegmentResult],
    frame_size: tuple[int, int],
    smooth: bool = True,
    smoothing: OneEuroConfig | None = None,
    tracker: TrackerConfig | None = None,
) -> FaceColumns:
    """Join a video's segments held in memory (in any order, with their results): :func:`stitch_stream` fed from
    the list, so a video finished here and one the job finishes from its segment files get the same rows."""
    order = sorted(range(len(results)), key=lambda k: results[k].start)
    pieces = stitch_stream(lambda k: segments[order[k]], [results[k] for k in order], frame_size, smooth=smooth,
                           smoothing=smoothing, tracker=tracker)
    return FaceColumns.concat(list(pieces))
