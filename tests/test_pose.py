import numpy as np
import pytest

from conftest import mean_face
from fkp_core.constants import FLIP_PERMUTATION, NOSE_TIP, NUM_KEYPOINTS
from fkp_core.pose import (
    MODEL_POINTS,
    POSE_POINTS,
    PoseConfig,
    angles_from_rotation,
    camera_matrix,
    draw_pose_axes,
    head_pose,
    model_points,
    rotation_matrix,
    turn_index,
)

W, H = 640, 480


def project(yaw: float, pitch: float, roll: float, t: tuple[float, float, float] = (0.0, 0.0, 600.0)) -> np.ndarray:
    """(68, 2) keypoints of the pose model at these angles through the default camera.

    The model's points only; the other 60 sit at their centroid (head_pose does not use them).
    """
    k = camera_matrix((W, H))
    pts = model_points() @ rotation_matrix(yaw, pitch, roll).T + np.asarray(t)
    uv = pts @ k.T
    uv = uv[:, :2] / uv[:, 2:]
    kp = np.tile(uv.mean(axis=0), (NUM_KEYPOINTS, 1))
    kp[list(POSE_POINTS)] = uv
    return kp


def mirror(kp: np.ndarray) -> np.ndarray:
    out = kp.copy()
    out[..., 0] = W - 1 - out[..., 0]
    return out[..., list(FLIP_PERMUTATION), :]


def rotate_on_screen(kp: np.ndarray, degrees: float) -> np.ndarray:
    """Turn keypoints counter-clockwise as seen on screen (y down) about their centroid."""
    a = np.deg2rad(degrees)
    c = kp.mean(axis=0)
    r = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return (kp - c) @ r.T + c


def test_model_is_mirror_symmetric_and_uses_named_points():
    for i, (x, y, z) in MODEL_POINTS.items():
        assert MODEL_POINTS[FLIP_PERMUTATION[i]] == (-x, y, z)
    assert len(POSE_POINTS) >= 6 and NOSE_TIP in POSE_POINTS


def test_rotation_matrix_round_trip_and_sign_conventions():
    for angles in [(10, -20, 30), (-45, 15, -5), (0, 0, 0)]:
        r = rotation_matrix(*angles)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(angles_from_rotation(r), angles, atol=1e-9)
    # yaw > 0: the nose (in front of the eyes, -Z) moves toward image right relative to the eyes
    nose, eye = np.array([0, 0, -1.0]), np.array([0, 0, 0.0])
    assert (rotation_matrix(20, 0, 0) @ nose)[0] > (rotation_matrix(20, 0, 0) @ eye)[0]
    # pitch > 0: the nose moves up (-y)
    assert (rotation_matrix(0, 20, 0) @ nose)[1] < 0
    # roll > 0: the subject's left eye (+X) rises (-y)
    assert (rotation_matrix(0, 0, 20) @ np.array([1.0, 0, 0]))[1] < 0


def test_recovers_known_rotations():
    for yaw in (-50, -25, 0, 25, 50):
        for pitch in (-25, 0, 25):
            for roll in (-25, 0, 25):
                kp = project(yaw, pitch, roll, (60, -40, 700))
                got = head_pose(kp[None], (W, H))
                assert got.shape == (1, 3) and got.dtype == np.float32
                np.testing.assert_allclose(got[0], [yaw, pitch, roll], atol=0.5)


def test_recovers_rotations_from_noisy_keypoints_within_a_few_degrees():
    rng = np.random.default_rng(0)
    truth, faces = [], []
    for yaw in (-30, 0, 30):
        for pitch in (-15, 15):
            kp = project(yaw, pitch, 8) + rng.normal(0, 1.0, (NUM_KEYPOINTS, 2))  # 1 px on a ~100 px face
            truth.append((yaw, pitch, 8))
            faces.append(kp)
    got = head_pose(np.stack(faces), (W, H))
    assert np.abs(got - np.array(truth)).max() < 4.0


def test_signs_on_a_generic_frontal_face():
    face = mean_face(120, (320, 240)).astype(np.float64)  # a 2D frontal layout, not the 3D model
    frontal = head_pose(face[None], (W, H))[0]
    assert abs(frontal[0]) < 1 and abs(frontal[2]) < 1  # symmetric face: no yaw, no roll
    tilted = head_pose(rotate_on_screen(face, 20)[None], (W, H))[0]
    assert tilted[2] == pytest.approx(20, abs=3)  # counter-clockwise on screen: roll > 0
    assert abs(tilted[0]) < 3
    # turning to the subject's left moves the nose to the image right: yaw > 0
    turned = face.copy()
    turned[27:36, 0] += 8
    assert head_pose(turned[None], (W, H))[0, 0] > 5


def test_mirroring_flips_yaw_and_roll_and_keeps_pitch():
    kp = project(25, 12, 7, (40, 20, 650))
    a = head_pose(kp[None], (W, H))[0]
    b = head_pose(mirror(kp)[None], (W, H))[0]
    np.testing.assert_allclose(b, [-a[0], a[1], -a[2]], atol=0.5)
    face = rotate_on_screen(mean_face(120, (300, 240)).astype(np.float64), 15)
    face[27:36, 0] += 6
    c = head_pose(face[None], (W, H))[0]
    d = head_pose(mirror(face)[None], (W, H))[0]
    np.testing.assert_allclose(d, [-c[0], c[1], -c[2]], atol=0.5)


def test_empty_and_failed_inputs():
    out = head_pose(np.zeros((0, NUM_KEYPOINTS, 2)), (W, H))
    assert out.shape == (0, 3) and out.dtype == np.float32
    faces = np.stack([np.full((NUM_KEYPOINTS, 2), np.nan), np.zeros((NUM_KEYPOINTS, 2)), project(10, 0, 0)])
    bad = head_pose(faces, (W, H))
    assert np.isnan(bad[0]).all() and np.isnan(bad[1]).all() and np.isfinite(bad[2]).all()
    with pytest.raises(ValueError):
        PoseConfig(points=(30, 8))
    # a narrower field of view (longer lens) still recovers the angles when the camera matches
    k_scale = 1.5
    cfg = PoseConfig(focal_scale=k_scale)
    kcam = camera_matrix((W, H), k_scale)
    pts = model_points() @ rotation_matrix(-20, 10, 5).T + [0, 0, 900]
    uv = pts @ kcam.T
    kp = np.tile((uv[:, :2] / uv[:, 2:]).mean(0), (NUM_KEYPOINTS, 1))
    kp[list(POSE_POINTS)] = uv[:, :2] / uv[:, 2:]
    np.testing.assert_allclose(head_pose(kp[None], (W, H), cfg)[0], [-20, 10, 5], atol=0.5)


def test_draw_pose_axes_returns_a_new_image_with_the_gizmo():
    frame = np.full((H, W), 100, np.uint8)
    kp = project(20, -10, 15)
    pose = head_pose(kp[None], (W, H))
    out = draw_pose_axes(frame, kp[None], pose)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (frame == 100).all()  # input untouched
    x, y = np.round(kp[NOSE_TIP]).astype(int)
    patch = out[y - 40 : y + 41, x - 40 : x + 41].astype(int)
    red = (patch[..., 2] > 180) & (patch[..., 0] < 90)
    green = (patch[..., 1] > 150) & (patch[..., 2] < 90)
    blue = (patch[..., 0] > 180) & (patch[..., 2] < 90)
    assert red.sum() > 10 and green.sum() > 10 and blue.sum() > 5
    # X (red) points to the subject's left = image right for a near-frontal face
    ys, xs = np.nonzero(red)
    assert xs.mean() > 40
    # nothing to draw: a copy
    bgr = np.zeros((H, W, 3), np.uint8)
    same = draw_pose_axes(bgr, np.zeros((0, NUM_KEYPOINTS, 2)), np.zeros((0, 3)))
    assert same is not bgr and (same == 0).all()
    skipped = draw_pose_axes(bgr, kp[None], np.full((1, 3), np.nan))
    assert (skipped == 0).all()
    with pytest.raises(ValueError):
        draw_pose_axes(bgr, kp[None], np.zeros((2, 3)))


def test_turn_index_is_zero_for_a_frontal_face_and_ignores_roll_mirror_and_scale():
    face = mean_face()
    assert turn_index(face[None])[0] == pytest.approx(0.0, abs=1e-6)
    turned = face.copy()
    half_width = (face[16, 0] - face[0, 0]) / 2
    turned[NOSE_TIP, 0] += half_width / 4  # toward the image right
    t = turn_index(turned[None])[0]
    assert t == pytest.approx(0.25, abs=1e-6)
    mirrored = turned.copy()
    mirrored[:, 0] = W - 1 - mirrored[:, 0]
    mirrored = mirrored[list(FLIP_PERMUTATION)]
    for other in (rotate_on_screen(turned, 30.0), mirrored, turned * 3.0):
        assert turn_index(other[None])[0] == pytest.approx(t, abs=1e-6)


def test_turn_index_grows_with_the_turn_and_stops_at_one():
    face = mean_face()
    half_width = (face[16, 0] - face[0, 0]) / 2
    shares = [0.0, 0.2, 0.5, 0.8, 1.0, 1.8]
    faces = np.stack([face.copy() for _ in shares])
    for f, share in zip(faces, shares):
        f[NOSE_TIP, 0] -= share * half_width  # toward the image left
    assert turn_index(faces) == pytest.approx([0.0, 0.2, 0.5, 0.8, 1.0, 1.0], abs=1e-6)
