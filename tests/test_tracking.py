import itertools

import cv2
import numpy as np
import pytest

from conftest import face_image, mean_face
from fkp_core.tracking import (
    SCENE_CUT_THRESHOLD,
    ConsistencyConfig,
    SegmentTracks,
    Tracker,
    TrackerConfig,
    crop_box_from_keypoints,
    cut_score,
    face_size,
    frame_signature,
    global_track_ids,
    keypoint_consistency,
    linear_assignment,
    stitch_segments,
)
from fkp_core.transforms import box_from_keypoints

FACE = 80  # mean_face width in pixels


def face_at(center: tuple[float, float], rng: np.random.Generator | None = None, noise: float = 0.8) -> np.ndarray:
    kp = mean_face(FACE, center).astype(np.float64)
    if rng is not None:
        kp = kp + rng.normal(0, noise, kp.shape)
    return kp


def crossing_clip(n: int = 40, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Faces A (left -> right) and B (right -> left) crossing 4 px apart vertically at 7.5 px per frame.

    Without motion the nearest previous position is the other face's at the crossing (4 px vs
    7.5 px away): only the velocity keeps the ids. ``truth`` is 0 for A, 1 for B.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(n):
        a = face_at((100 + 7.5 * f, 200), rng)
        b = face_at((100 + 7.5 * (n - 1 - f), 204), rng)
        kps = np.stack([a, b])
        order = [0, 1] if f % 2 else [1, 0]  # the detector's order carries no identity
        frames.append({"frame": f, "kp": kps[order], "truth": np.array(order)})
    return frames


def run(tracker: Tracker, frames: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    return [tracker.update(fr["frame"], box_from_keypoints(fr["kp"]).reshape(-1, 4), fr["kp"]) for fr in frames]


def id_of_truth(frames: list[dict[str, np.ndarray]], ids: list[np.ndarray]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for fr, got in zip(frames, ids):
        for t, i in zip(fr["truth"], got):
            out.setdefault(int(t), set()).add(int(i))
    return out


# ---- assignment ----


def test_linear_assignment_is_optimal_on_small_matrices():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, m = (int(v) for v in rng.integers(1, 5, 2))
        cost = rng.integers(0, 6, (n, m)).astype(float) if trial % 2 else rng.random((n, m))
        rows, cols = linear_assignment(cost)
        assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n <= m:
            best = min(cost[list(range(n)), list(p)].sum() for p in itertools.permutations(range(m), n))
        else:
            best = min(cost[list(p), list(range(m))].sum() for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum() == pytest.approx(best)
    rows, cols = linear_assignment(np.zeros((0, 3)))
    assert rows.shape == cols.shape == (0,)


# ---- the per-segment tracker ----


def test_the_crossing_clip_needs_motion():
    # positions alone would swap the ids: at the crossing each face's nearest previous position is the other's
    frames = crossing_clip()
    swaps = 0
    for prev, cur in zip(frames, frames[1:]):
        old = {int(t): k.mean(0) for t, k in zip(prev["truth"], prev["kp"])}
        new = {int(t): k.mean(0) for t, k in zip(cur["truth"], cur["kp"])}
        swaps += np.linalg.norm(new[0] - old[1]) < np.linalg.norm(new[0] - old[0])
    assert swaps >= 1


def test_crossing_faces_keep_their_ids():
    frames = crossing_clip()
    ids = run(Tracker(), frames)
    per_face = id_of_truth(frames, ids)
    assert len(per_face[0]) == 1 and len(per_face[1]) == 1
    assert per_face[0] != per_face[1]
    assert all(i.dtype == np.int64 for i in ids)


def test_face_missing_for_a_few_frames_keeps_its_id():
    frames = crossing_clip()
    # A (truth 0) is not detected in frames 12..17 (6 frames <= max_gap 10)
    for fr in frames[12:18]:
        keep = fr["truth"] != 0
        fr["kp"], fr["truth"] = fr["kp"][keep], fr["truth"][keep]
    per_face = id_of_truth(frames, run(Tracker(), frames))
    assert len(per_face[0]) == 1 and len(per_face[1]) == 1 and per_face[0] != per_face[1]


def test_face_missing_longer_than_max_gap_gets_a_new_id():
    rng = np.random.default_rng(1)
    tracker = Tracker(TrackerConfig(max_gap=3))
    first = tracker.update(0, box_from_keypoints(face_at((200, 200), rng))[None], face_at((200, 200), rng)[None])
    assert tracker.update(4, np.zeros((0, 4)), np.zeros((0, 68, 2))).shape == (0,)
    again = tracker.update(5, box_from_keypoints(face_at((200, 200)))[None], face_at((200, 200), rng)[None])
    assert again[0] != first[0]  # 4 frames missed > max_gap 3
    tracker2 = Tracker(TrackerConfig(max_gap=3))
    a = tracker2.update(0, box_from_keypoints(face_at((200, 200)))[None], face_at((200, 200), rng)[None])
    b = tracker2.update(4, box_from_keypoints(face_at((200, 200)))[None], face_at((200, 200), rng)[None])
    assert a[0] == b[0]  # 3 frames missed: still the same track


def test_face_entering_mid_video_gets_a_new_id_and_reset_starts_new_ids():
    rng = np.random.default_rng(2)
    tracker = Tracker()
    ids = []
    for f in range(20):
        kps = [face_at((150 + 2 * f, 200), rng)]
        if f >= 10:
            kps.append(face_at((450, 220 - f), rng))  # enters at frame 10, far from the first
        kps = np.stack(kps)
        ids.append(tracker.update(f, box_from_keypoints(kps), kps))
    assert {int(i[0]) for i in ids} == {0}
    assert {int(i[1]) for i in ids[10:]} == {1}
    tracker.reset()  # scene cut: the same places, new people
    kps = np.stack([face_at((190, 200), rng), face_at((450, 200), rng)])
    after = tracker.update(20, box_from_keypoints(kps), kps)
    assert after.tolist() == [2, 3] and tracker.next_id == 4


def test_faces_known_to_continue_a_track_keep_its_id_and_the_rest_are_matched():
    rng = np.random.default_rng(4)
    tracker = Tracker()
    kps = np.stack([face_at((150, 200), rng), face_at((450, 200), rng)])
    first = tracker.update(0, box_from_keypoints(kps), kps)
    # the two faces swap places in one frame: by position they would swap ids; the hint says who is who
    swapped = kps[::-1].copy()
    hinted = tracker.update(1, box_from_keypoints(swapped), swapped, continues=first)
    assert hinted.tolist() == first.tolist()
    # an unknown or already used id is no hint: that face is matched like any other (here: to the free track)
    tracker = Tracker()
    first = tracker.update(0, box_from_keypoints(kps), kps)
    got = tracker.update(1, box_from_keypoints(kps), kps, continues=np.array([first[0], first[0]]))
    assert got.tolist() == first.tolist()
    got = tracker.update(2, box_from_keypoints(kps), kps, continues=np.array([99, -1]))
    assert got.tolist() == first.tolist()
    # a hint for a track that has ended is ignored: the face starts a new track
    lone = face_at((800, 600), rng)[None]
    assert tracker.update(30, box_from_keypoints(lone), lone, continues=first[:1])[0] == tracker.next_id - 1 >= 2
    with pytest.raises(ValueError):
        tracker.update(31, box_from_keypoints(lone), lone, continues=np.array([0, 1]))


def test_the_tracker_hands_back_the_last_frames_faces_with_what_the_fast_path_carries():
    """The fast path follows the faces of the last frame from the tracker's state, not a copy of its own."""
    rng = np.random.default_rng(5)
    tracker = Tracker()
    assert len(tracker.followed().ids) == 0
    kps = np.stack([face_at((150, 200), rng), face_at((450, 200), rng)]).astype(np.float32)
    ids = tracker.update(0, box_from_keypoints(kps), kps, detector_scores=np.array([0.9, 0.6]), misses=np.array([0, 2]))
    later = kps[::-1].copy()  # given in the other order: the ids and what they carry follow the order given
    ids1 = tracker.update(1, box_from_keypoints(later), later, continues=ids[::-1].copy(), detector_scores=np.array([0.5, 0.8]))
    f = tracker.followed()
    assert f.ids.tolist() == ids1.tolist() == ids[::-1].tolist()
    np.testing.assert_array_equal(f.keypoints, later)
    assert f.keypoints.dtype == np.float32
    assert f.detector_scores.tolist() == [0.5, 0.8] and f.misses.tolist() == [0, 0]
    # only the last frame's faces: a track the frame did not continue is not followed (though still live for matching)
    one = later[:1]
    tracker.update(2, box_from_keypoints(one), one, continues=ids1[:1], misses=np.array([3]))
    f = tracker.followed()
    assert f.ids.tolist() == ids1[:1].tolist() and f.misses.tolist() == [3] and np.isnan(f.detector_scores[0])
    tracker.reset()
    assert len(tracker.followed().ids) == 0 and tracker.followed().keypoints.shape == (0, 68, 2)


def test_frames_must_increase_and_shapes_must_agree():
    tracker = Tracker()
    kp = face_at((200, 200))[None]
    tracker.update(5, box_from_keypoints(kp), kp)
    with pytest.raises(ValueError):
        tracker.update(5, box_from_keypoints(kp), kp)
    with pytest.raises(ValueError):
        tracker.update(6, np.zeros((2, 4)), kp)


# ---- scene cuts ----


def _natural(seed: int, shift: int = 0) -> np.ndarray:
    """A smooth random gray 'scene' (240 x 320); ``shift`` pans the camera by that many pixels."""
    r = np.random.default_rng(seed)
    img = cv2.resize(r.integers(0, 256, (6, 8)).astype(np.uint8), (400, 240), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(img, (0, 0), 3)[:, shift : shift + 320]


def is_scene_cut(prev_gray, gray) -> bool:
    """The segment annotator's test between consecutive frames (fkp_core.annotator)."""
    return cut_score(frame_signature(prev_gray), frame_signature(gray)) > SCENE_CUT_THRESHOLD


def test_scene_cut_detection():
    rng = np.random.default_rng(3)
    face = face_image(mean_face(120, (160, 120)), (240, 320), seed=0)
    moved = face_image(mean_face(120, (166, 121)), (240, 320), seed=0)
    noisy = np.clip(moved + rng.normal(0, 4, moved.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(face.astype(int) + 15, 0, 255).astype(np.uint8)  # a flash / exposure step
    assert not is_scene_cut(face, noisy)
    assert not is_scene_cut(face, brighter)
    for s in range(4):
        assert not is_scene_cut(_natural(s), _natural(s, 16))  # a pan of 5 % of the width
        assert is_scene_cut(_natural(s), _natural(s + 10))  # another scene, similar tones
        assert is_scene_cut(face, _natural(s))
    bgr = cv2.cvtColor(face, cv2.COLOR_GRAY2BGR)
    assert cut_score(frame_signature(bgr), frame_signature(face)) == pytest.approx(0.0, abs=1e-6)
    assert SCENE_CUT_THRESHOLD == 1.0


# ---- fit consistency (fast path) ----


def test_crop_box_is_the_training_box():
    assert crop_box_from_keypoints is box_from_keypoints


def test_keypoint_consistency_accepts_motion_and_rejects_lost_fits():
    rng = np.random.default_rng(4)
    prev = face_at((200, 200))
    size = float(face_size(prev))
    # plausible next frames: small shift + noise, scale and in-plane rotation (similarity moves)
    assert keypoint_consistency(prev, prev + rng.normal(0, 0.01 * size, prev.shape) + 0.05 * size) > 0.9
    c = prev.mean(0)
    a = np.deg2rad(8)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * 1.06
    assert keypoint_consistency(prev, (prev - c) @ rot.T + c) > 0.9
    # lost fits
    redetect = ConsistencyConfig().redetect_below
    assert keypoint_consistency(prev, prev + [0.5 * size, 0]) < redetect  # jumped half a face
    assert keypoint_consistency(prev, prev[rng.permutation(68)]) < redetect  # shape broken up
    assert keypoint_consistency(prev, c + (prev - c) * [1.0, 0.15]) < redetect  # squashed flat
    assert keypoint_consistency(prev, c + rng.normal(0, 0.02 * size, prev.shape)) < redetect  # collapsed
    assert keypoint_consistency(prev, np.full_like(prev, np.nan)) == 0.0
    assert 0.0 <= keypoint_consistency(prev, prev + rng.normal(0, 0.1 * size, prev.shape)) <= 1.0


def test_keypoint_consistency_against_the_crop_box():
    # the fast path can score the new fit against the box it was cropped from instead
    rng = np.random.default_rng(6)
    prev = face_at((200, 200))
    size = float(face_size(prev))
    crop_box = crop_box_from_keypoints(prev)
    assert keypoint_consistency(crop_box, prev + rng.normal(0, 0.01 * size, prev.shape) + 0.04 * size) > 0.9
    assert keypoint_consistency(crop_box, prev + [0, 0.45 * size]) < ConsistencyConfig().redetect_below
    c = prev.mean(0)
    assert keypoint_consistency(crop_box, c + (prev - c) * 0.4) < ConsistencyConfig().redetect_below  # shrunk fit
    with pytest.raises(ValueError):
        keypoint_consistency(np.zeros(3), prev)


# ---- stitching segments ----


def _segment(frames: list[dict], start: int, end: int, reverse: bool = False, **extra) -> SegmentTracks:
    """Track frames [start, end) with a fresh tracker, as a segment task does."""
    tracker = Tracker()
    rows: dict[str, list] = {"frame_index": [], "track_id": [], "boxes": [], "keypoints": []}
    for fr in frames:
        if not start <= fr["frame"] < end:
            continue
        kp = fr["kp"][::-1] if reverse else fr["kp"]
        ids = tracker.update(fr["frame"], box_from_keypoints(kp).reshape(-1, 4), kp)
        rows["frame_index"] += [fr["frame"]] * len(ids)
        rows["track_id"] += ids.tolist()
        rows["boxes"] += list(box_from_keypoints(kp).reshape(-1, 4))
        rows["keypoints"] += list(kp)
    return SegmentTracks(start, end, **{k: np.asarray(v) for k, v in rows.items()}, **extra)


def _truth_rows(frames: list[dict[str, np.ndarray]], start: int, end: int, reverse: bool = False) -> list[int]:
    rows = [fr["truth"][::-1] if reverse else fr["truth"] for fr in frames if start <= fr["frame"] < end]
    return [int(t) for truth in rows for t in truth]


def test_stitching_keeps_one_id_across_boundaries_and_orders_by_first_appearance():
    rng = np.random.default_rng(5)
    frames = crossing_clip(60)
    for fr in frames:  # face C (truth 2) enters in frame 45, in the third segment
        if fr["frame"] >= 45:
            fr["kp"] = np.concatenate([fr["kp"], face_at((300, 400), rng)[None]])
            fr["truth"] = np.concatenate([fr["truth"], [2]])
    bounds = [(0, 19), (19, 38), (38, 60)]  # the crossing (frame ~30) happens inside segment 2
    segs = [_segment(frames, s, e, reverse=(k == 1)) for k, (s, e) in enumerate(bounds)]
    assert segs[1].track_id.min() == 0  # local ids restart in every segment
    mappings = stitch_segments(segs)
    got: dict[int, set[int]] = {}
    for seg, mapping, (s, e), k in zip(segs, mappings, bounds, range(3)):
        for t, g in zip(_truth_rows(frames, s, e, reverse=(k == 1)), global_track_ids(seg, mapping)):
            got.setdefault(t, set()).add(int(g))
    # frame 0 lists B first (odd frames list A first): B appears first in row order -> 0
    assert got == {1: {0}, 0: {1}, 2: {2}}
    # input order does not matter
    assert stitch_segments([segs[2], segs[0], segs[1]]) == [mappings[2], mappings[0], mappings[1]]


def test_stitching_bridges_a_gap_at_the_boundary_like_one_tracker():
    frames = crossing_clip(40)
    for fr in frames[17:23]:  # A unseen in frames 17..22, across the boundary at 20
        keep = fr["truth"] != 0
        fr["kp"], fr["truth"] = fr["kp"][keep], fr["truth"][keep]
    whole = run(Tracker(), frames)
    segs = [_segment(frames, 0, 20), _segment(frames, 20, 40)]
    mappings = stitch_segments(segs)
    stitched = np.concatenate([global_track_ids(s, m) for s, m in zip(segs, mappings)])
    np.testing.assert_array_equal(stitched, np.concatenate(whole))  # same ids as one tracker on the whole clip


def test_no_link_across_a_scene_cut_at_the_boundary():
    frames = crossing_clip(40)
    shot1 = frame_signature(_natural(0))
    shot2 = frame_signature(_natural(11))
    same = [_segment(frames, 0, 20, tail_signature=shot1), _segment(frames, 20, 40, head_signature=shot1)]
    assert sorted(set(stitch_segments(same)[1].values())) == [0, 1]  # one shot: linked
    cut = [_segment(frames, 0, 20, tail_signature=shot1), _segment(frames, 20, 40, head_signature=shot2)]
    m = stitch_segments(cut)
    assert sorted(m[0].values()) == [0, 1] and sorted(m[1].values()) == [2, 3]  # cut: new ids
    # a cut the segment task found itself (it decoded frame start - 1) works the same way
    told = [_segment(frames, 0, 20), _segment(frames, 20, 40, cuts=np.array([20]))]
    assert stitch_segments(told) == m
    # and so does a cut inside the next segment before its faces appear
    late = [f for f in frames if not 20 <= f["frame"] < 23]
    inside = [_segment(late, 0, 20), _segment(late, 20, 40, cuts=np.array([22]))]
    assert sorted(stitch_segments(inside)[1].values()) == [2, 3]


def test_stitching_edge_cases():
    assert stitch_segments([]) == []
    empty = SegmentTracks(0, 10)
    frames = crossing_clip(20)
    assert stitch_segments([empty, _segment(frames, 10, 20)]) == [{}, {0: 0, 1: 1}]
    with pytest.raises(ValueError):
        stitch_segments([SegmentTracks(0, 10), SegmentTracks(5, 15)])
    with pytest.raises(ValueError):
        SegmentTracks(0, 10, frame_index=[12], track_id=[0], boxes=np.zeros((1, 4)), keypoints=np.zeros((1, 68, 2)))
