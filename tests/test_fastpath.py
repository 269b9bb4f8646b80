"""Issue 7 behaviour on real faces: tracks through crossings and cuts, the fast path, smoothing, pose signs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import PROJECT_ROOT
from fkp_core.annotator import AnnotateConfig, SegmentAnnotator
from fkp_core.detector import HaarConfig, HaarDetector
from fkp_core.landmarks import Landmarker
from fkp_core.metrics import interocular, nme
from fkp_core.transforms import box_from_keypoints
from fkp_core.video import DecodedFrame, VideoWriter, read_frames

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"
TRUTH = PROJECT_ROOT / "examples" / "sample_truth.csv"


@pytest.fixture(scope="module")
def landmarker():
    return Landmarker()


@pytest.fixture(scope="module")
def face_patches():
    """Two different real faces (frames of two shots of the sample clip), 160 px square, gray."""
    truth = pd.read_csv(TRUTH).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)
    patches = []
    for frame in (0, 45):
        img = next(iter(read_frames(SAMPLE, frame, frame + 1, gray=True))).image
        x, y, w, h = box_from_keypoints(truth[frame])
        cx, cy, side = x + w / 2, y + h / 2, 160
        x0, y0 = int(np.clip(cx - side / 2, 0, img.shape[1] - side)), int(np.clip(cy - side / 2, 0, img.shape[0] - side))
        patches.append(img[y0 : y0 + side, x0 : x0 + side].copy())
    return patches


def annotate(lm, frames, k=1):
    a = SegmentAnnotator(lm.predict_crops, lm.size, lm.margin, HaarDetector(HaarConfig(min_size=40)), AnnotateConfig(detect_every=k))
    return a.run(frames), a


def frames_of(images, fps=25.0):
    return [DecodedFrame(i, i / fps, im) for i, im in enumerate(images)]


def test_two_faces_crossing_keep_their_ids(landmarker, face_patches):
    a, b = face_patches
    images = []
    for t in range(60):  # A moves right along the top, B left along the bottom; they pass each other mid-clip
        canvas = np.full((400, 720), 90, np.uint8)
        xa, xb = int(20 + 8.5 * t), int(540 - 8.5 * t)
        canvas[20:180, xa : xa + 160] = a
        canvas[220:380, xb : xb + 160] = b
        images.append(canvas)
    cols, _ = annotate(landmarker, frames_of(images))
    assert len(np.unique(cols.frame_index)) >= 57
    top = cols.track_id[cols.boxes[:, 1] < 200]
    bottom = cols.track_id[cols.boxes[:, 1] >= 200]
    assert len(np.unique(top)) == 1 and len(np.unique(bottom)) == 1 and top[0] != bottom[0]


def test_a_scene_cut_starts_new_ids(landmarker, face_patches):
    a, _ = face_patches
    first = [np.pad(a, 100, constant_values=90)] * 20
    second = [np.pad(a, 100, constant_values=200)[:, ::-1].copy()] * 20  # same face, other shot (mirrored, brighter)
    cols, annot = annotate(landmarker, frames_of(first + second))
    assert annot.stats.cuts == [20]
    before, after = cols.track_id[cols.frame_index < 20], cols.track_id[cols.frame_index >= 20]
    assert len(np.unique(before)) == len(np.unique(after)) == 1 and before[0] != after[0]


@pytest.mark.parametrize("k", [5, 10])
def test_fast_path_finds_a_face_entering_mid_segment_within_k_frames(landmarker, face_patches, k):
    a, _ = face_patches
    blank = np.full((360, 480), 90, np.uint8)
    face = blank.copy()
    face[100:260, 160:320] = a
    enter = 13
    cols, annot = annotate(landmarker, frames_of([blank] * enter + [face] * 30), k)
    assert cols.frame_index.min() <= enter + k - 1
    # the detector did not run on every frame: K looks as the segment begins (a shot begins), then one every K frames
    assert annot.stats.detections < k + (enter + 30) / k + 3


@pytest.mark.parametrize("k", [10, 30])
def test_after_a_cut_the_fast_path_looks_on_every_frame_until_it_finds_the_face(landmarker, face_patches, k):
    """A shot whose face Haar misses on its first two frames (here: out of focus, then sharp, as
    Haar misses a face for a frame or two): the face is found on the first frame the detector can
    see it, not K frames later."""
    import cv2

    a, _ = face_patches
    shot1 = np.full((360, 480), 90, np.uint8)
    shot1[100:260, 160:320] = a
    shot2 = np.full((360, 480), 200, np.uint8)
    shot2[60:220, 40:200] = a[:, ::-1]
    blurred = cv2.GaussianBlur(shot2, (0, 0), 20)
    assert len(HaarDetector(HaarConfig(min_size=40)).detect(blurred)) == 0
    cols, annot = annotate(landmarker, frames_of([shot1] * 20 + [blurred] * 2 + [shot2] * 40), k)
    assert annot.stats.cuts == [20]  # focus coming back is not a new shot
    assert cols.frame_index[cols.frame_index >= 20].min() == 22
    assert set(range(22, 62)) <= set(cols.frame_index)
    assert annot.stats.detections <= 2 + 3 + 40 // k + 2  # two looks in shot 1, three after the cut, then every K


@pytest.mark.parametrize("k", [10, 30])
def test_a_segment_starts_like_a_shot_the_fast_path_looks_on_every_frame_until_it_finds_the_face(landmarker, face_patches, k):
    """A segment (or video) whose face Haar cannot see on its first two frames: found on the third
    frame, not K frames later. A segment that begins at a scene cut thus behaves as the cut inside a
    segment does, with no need to look at the frame before the segment."""
    import cv2

    a, _ = face_patches
    shot = np.full((360, 480), 200, np.uint8)
    shot[60:220, 40:200] = a[:, ::-1]
    blurred = cv2.GaussianBlur(shot, (0, 0), 20)
    cols, annot = annotate(landmarker, frames_of([blurred] * 2 + [shot] * 40), k)
    assert cols.frame_index.min() == 2
    assert set(range(2, 42)) <= set(cols.frame_index)
    assert annot.stats.detections <= 3 + 40 // k + 2


def test_fast_path_accuracy_matches_per_frame_detection(landmarker):
    truth = pd.read_csv(TRUTH).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)
    frames = list(read_frames(SAMPLE, 0, 160, gray=True))
    every, a1 = annotate(landmarker, frames, 1)
    fast, a10 = annotate(landmarker, frames, 10)
    e1 = nme(every.keypoints, truth[every.frame_index]).mean()
    e10 = nme(fast.keypoints, truth[fast.frame_index]).mean()
    assert len(fast) >= len(every) - 2
    assert e10 <= 1.05 * e1
    assert a10.stats.detections <= a1.stats.detections / 5


def test_smoothing_halves_jitter_on_a_still_noisy_face(ray_session, tmp_path):
    from jobs import annotate as job

    first = next(iter(read_frames(SAMPLE, 0, 1))).image
    rng = np.random.default_rng(0)
    clip = tmp_path / "still.mp4"
    with VideoWriter(clip, 30, first.shape[1], first.shape[0], crf=12) as w:
        for _ in range(90):
            w.write(np.clip(first + rng.normal(0, 4, first.shape), 0, 255).astype(np.uint8))
    assert job.main([str(clip), "--out", str(tmp_path / "out"), "-q"]) == 0
    df = pd.read_parquet(tmp_path / "out")
    jitter = {}
    for col in ("keypoints_raw", "keypoints"):
        kp = np.stack(df[col].to_numpy()).reshape(-1, 68, 2)
        jitter[col] = (np.linalg.norm(np.diff(kp, axis=0), axis=-1).mean(axis=-1) / interocular(kp[1:])).mean()
    assert jitter["keypoints"] < 0.5 * jitter["keypoints_raw"]


def test_pose_columns_follow_a_rolled_and_mirrored_face(landmarker, face_patches):
    import cv2

    from fkp_core.pose import head_pose

    a, _ = face_patches
    canvas = np.pad(a, 120, constant_values=90)
    h, w = canvas.shape
    upright = landmarker(canvas)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)  # +20 degrees: counter-clockwise on screen
    rolled = landmarker(cv2.warpAffine(canvas, m, (w, h), borderMode=cv2.BORDER_REPLICATE))
    mirrored = landmarker(canvas[:, ::-1].copy())
    assert len(upright) == len(rolled) == len(mirrored) == 1
    p0, pr, pm = (head_pose(f.keypoints, (w, h))[0] for f in (upright, rolled, mirrored))
    assert 12 < pr[2] - p0[2] < 28  # roll grows by about the rotation
    assert np.sign(pm[0]) != np.sign(p0[0]) or abs(p0[0]) < 3  # mirroring flips yaw
    assert abs(pm[0] + p0[0]) < 6 and abs(pm[2] + p0[2]) < 6 and abs(pm[1] - p0[1]) < 6
