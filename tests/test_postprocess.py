"""A video's rows joined from segments: smoothing and pose as if each track were done in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import mean_face
from fkp_core.records import SegmentResult
from fkp_core.pose import head_pose
from fkp_core.postprocess import postprocess_segment, postprocess_video
from fkp_core.smoothing import OneEuroConfig, smooth_track
from fkp_core.tables import FaceColumns
from fkp_core.transforms import box_from_keypoints

FPS = 30.0
SIZE = (640, 480)


def _track(frames: np.ndarray, seed: int, x0: float) -> np.ndarray:
    """Noisy keypoints of a face drifting right and bobbing, (len(frames), 68, 2) float32."""
    rng = np.random.default_rng(seed)
    base = mean_face(120, (0.0, 0.0))
    path = np.stack([x0 + 1.5 * frames, 240 + 20 * np.sin(frames / 15.0)], axis=-1)
    return (base[None] + path[:, None] + rng.normal(0, 1.5, (len(frames), 68, 2))).astype(np.float32)


def _segment(kps: dict[int, tuple[np.ndarray, np.ndarray]], start: int, end: int, local_ids: dict[int, int]) -> tuple[FaceColumns, dict]:
    """One segment's rows (faces of frames [start, end)), local track ids as given, frame order."""
    rows = []
    for face, (frames, kp) in kps.items():
        for f, k in zip(frames, kp):
            if start <= f < end:
                rows.append((int(f), face, k))
    rows.sort(key=lambda r: (r[0], r[1]))
    n = len(rows)
    kp = np.stack([r[2] for r in rows]).astype(np.float32)
    frame = np.array([r[0] for r in rows], np.int64)
    cols = FaceColumns(
        frame_index=frame, timestamp_s=frame / FPS, face_index=np.zeros(n, np.int32),
        track_id=np.array([local_ids[r[1]] for r in rows], np.int64), boxes=np.round(box_from_keypoints(kp)).astype(np.int32),
        detected=np.ones(n, bool), confidence=np.ones(n, np.float32), keypoints=kp.copy(), keypoints_raw=kp,
        pose=np.zeros((n, 3), np.float32),
    )
    return postprocess_segment(cols, SIZE), SegmentResult(start=start, end=end)


@pytest.mark.parametrize("bounds", [[0, 70, 100, 300], [0, 150, 300], [0, 20, 40, 60, 300]])
def test_segments_joined_equal_one_pass_over_each_track(bounds):
    frames_a = np.arange(0, 300)
    frames_b = np.arange(120, 260)  # a second face that appears later, far from the first
    faces = {0: (frames_a, _track(frames_a, 0, 60.0)), 1: (frames_b, _track(frames_b, 1, 200.0))}
    parts = [_segment(faces, s, e, {0: 10 + k, 1: 20 - k}) for k, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    cold = FaceColumns.concat([p[0] for p in parts])  # each segment's own smoothing, before the join
    order = list(range(len(parts)))[::-1]  # segments may come in any order
    merged = postprocess_video([parts[i][0] for i in order], [parts[i][1] for i in order], SIZE)
    assert len(np.unique(merged.track_id)) == 2
    for face, (frames, raw) in faces.items():
        rows = np.flatnonzero(merged.track_id == merged.track_id[np.flatnonzero(merged.frame_index == frames[0])[-1]])
        assert np.array_equal(merged.frame_index[rows], frames) and np.array_equal(merged.keypoints_raw[rows], raw)
        whole = smooth_track(frames / FPS, raw)
        np.testing.assert_allclose(merged.keypoints[rows], whole, atol=2e-3)
        np.testing.assert_allclose(merged.pose[rows], head_pose(whole, SIZE), atol=1e-2)
        # without the join's fix-up, a segment's cold start leaves the rows after a boundary off by far more
        mine = np.isin(cold.frame_index, frames) & np.isin(cold.keypoints_raw[:, 0, 0], raw[:, 0, 0])
        assert np.array_equal(cold.frame_index[mine], frames)
        crosses = any(frames[0] < b <= frames[-1] for b in bounds)
        assert (np.abs(cold.keypoints[mine] - whole).max() > 0.05) == crosses


def test_settle_time_follows_the_frame_rate_and_cutoff():
    cfg = OneEuroConfig()
    assert 1.0 < cfg.settle_seconds(1 / 30) < 2.5
    assert cfg.settle_seconds(1 / 30, tolerance=1e-2) < cfg.settle_seconds(1 / 30)
    assert OneEuroConfig(min_cutoff=4.0).settle_seconds(1 / 30) < cfg.settle_seconds(1 / 30)


def test_without_smoothing_rows_are_raw_and_posed():
    frames = np.arange(0, 80)
    faces = {0: (frames, _track(frames, 2, 100.0))}
    parts = []
    for k, (s, e) in enumerate([(0, 40), (40, 80)]):
        cols, st = _segment(faces, s, e, {0: k})
        parts.append((postprocess_segment(cols, SIZE, smooth=False), st))
    merged = postprocess_video([p[0] for p in parts], [p[1] for p in parts], SIZE, smooth=False)
    np.testing.assert_array_equal(merged.keypoints, faces[0][1])
    np.testing.assert_allclose(merged.pose, head_pose(faces[0][1], SIZE), atol=1e-4)


# ---- joining: what it must do, segment by segment with bounded memory ------------------------------------------


def _video(bounds: list[int], cut: int | None = None):
    """Segments of a synthetic video: a face across every boundary (with a cut), one that comes and goes, one
    that appears in a short segment and continues; segments shorter than the smoothing's settle time."""
    frames_a = np.arange(bounds[0], bounds[-1])
    frames_b = np.concatenate([np.arange(10, 50), np.arange(54, 130)])  # a 3-frame gap inside a track
    frames_c = np.arange(35, bounds[-1] - 5)
    faces = {0: (frames_a, _track(frames_a, 0, 60.0)), 1: (frames_b, _track(frames_b, 1, 260.0)),
             2: (frames_c, _track(frames_c, 2, -150.0))}
    parts = []
    for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
        cols, res = _segment(faces, s, e, {0: 3 * k, 1: 3 * k + 1, 2: 3 * k + 2})
        if cut is not None and s <= cut < e:
            res.cuts = [cut]
            cols.track_id[(cols.track_id == 3 * k) & (cols.frame_index >= cut)] = 99  # the tracker was reset there ...
            cols = postprocess_segment(cols, SIZE)  # ... before the segment smoothed its tracks
        parts.append((cols, res))
    return parts


def _faces_of(parts, cut: int | None) -> dict[tuple[int, float], tuple[int, bool]]:
    """Each input row's face in :func:`_video` (0, 1, 2) and whether it is face 0 after the cut, by (frame, first raw x)."""
    faces = {}
    for cols, _ in parts:
        for f, t, x in zip(cols.frame_index.tolist(), cols.track_id.tolist(), cols.keypoints_raw[:, 0, 0].tolist()):
            face = 0 if t == 99 else t % 3
            faces[(f, x)] = (face, face == 0 and cut is not None and f >= cut)
    return faces


@pytest.mark.parametrize("bounds,cut", [([0, 20, 40, 60, 150, 200], 100), ([0, 70, 100, 300], None), ([0, 300], 150)])
@pytest.mark.parametrize("smooth", [True, False])
def test_stitching_keeps_every_row_once_one_id_per_face_and_smooths_across_boundaries(bounds, cut, smooth):
    """What joining must do, whatever the segments: every row once, in frame order; one global id per face across
    boundaries, gaps and short segments (0.. by first appearance), a new one after a scene cut; each track's
    keypoints and pose as one pass over the track gives (a cut starts the smoothing afresh); without smoothing,
    the segments' own rows untouched."""
    parts = _video(bounds, cut)
    faces = _faces_of(parts, cut)
    own = {k: (c.keypoints[i].copy(), c.pose[i].copy()) for c, _ in parts for i, k in
           enumerate(zip(c.frame_index.tolist(), c.keypoints_raw[:, 0, 0].tolist()))}
    merged = postprocess_video([c for c, _ in parts][::-1], [r for _, r in parts][::-1], SIZE, smooth=smooth)
    keys = list(zip(merged.frame_index.tolist(), merged.keypoints_raw[:, 0, 0].tolist()))
    assert sorted(keys) == sorted(faces) and len(set(keys)) == len(keys)  # every row, once
    assert np.all(np.diff(merged.frame_index) >= 0)
    label = np.array([faces[k][0] + 3 * faces[k][1] for k in keys])  # face 0 after the cut: 3
    ids = {int(lab): np.unique(merged.track_id[label == lab]) for lab in np.unique(label)}
    assert all(len(v) == 1 for v in ids.values()) and len({int(v[0]) for v in ids.values()}) == len(ids), ids
    first_seen = list(dict.fromkeys(merged.track_id.tolist()))
    assert first_seen == list(range(len(ids)))
    for lab in ids:
        rows = np.flatnonzero(label == lab)
        if smooth:
            whole = smooth_track(merged.timestamp_s[rows], merged.keypoints_raw[rows])
            np.testing.assert_allclose(merged.keypoints[rows], whole, atol=2e-3)
            np.testing.assert_allclose(merged.pose[rows], head_pose(whole, SIZE), atol=1e-2)
        else:
            assert all(np.array_equal(merged.keypoints[i], own[keys[i]][0]) for i in rows)
            assert all(np.array_equal(merged.pose[i], own[keys[i]][1], equal_nan=True) for i in rows)


def test_the_streamed_finish_holds_one_segment_at_a_time():
    """Segments are loaded in order, each once per pass, and a segment's rows are out before the next is loaded;
    the peak memory of 4x as many segments is that of a few (what the all-in-memory join cannot do)."""
    import tracemalloc

    from fkp_core.postprocess import stitch_stream

    def peak(segments: int) -> int:
        bounds = list(range(0, 150 * segments + 1, 150))
        results = [SegmentResult(s, e) for s, e in zip(bounds, bounds[1:])]
        calls: list[int] = []

        def load(k: int) -> FaceColumns:
            calls.append(k)
            frames = np.arange(bounds[k], bounds[k + 1])
            faces = {0: (frames, _track(frames, k, 60.0)), 1: (frames, _track(frames, 100 + k, 300.0))}
            return _segment(faces, bounds[k], bounds[k + 1], {0: 0, 1: 1})[0]

        tracemalloc.start()
        for k, cols in enumerate(stitch_stream(load, results, SIZE)):
            assert calls == list(range(segments)) + list(range(k + 1))  # the next one not yet loaded
            assert cols.frame_index.min() >= bounds[k] and cols.frame_index.max() < bounds[k + 1]
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    small, large = peak(6), peak(24)
    assert large < 1.3 * small, (small, large)
