import numpy as np
import pytest
import torch

from conftest import dot_image, grid_keypoints, mean_face
from fkp_core.constants import FLIP_PERMUTATION, LEFT_EYE, LEFT_EYE_OUTER, NUM_KEYPOINTS, RIGHT_EYE, RIGHT_EYE_OUTER
from fkp_core.transforms import (
    AugmentConfig,
    Compose,
    FaceCrop,
    RandomBlur,
    RandomBrightnessContrast,
    RandomDownscale,
    RandomHorizontalFlip,
    RandomNoise,
    RandomOcclusion,
    RandomRotation,
    RandomScale,
    RandomTranslate,
    Sample,
    ToFloat,
    Warp,
    apply_matrix,
    box_from_keypoints,
    crop_face,
    crop_matrix,
    denormalize_keypoints,
    normalize_keypoints,
    to_tensors,
    train_transform,
    uncrop_keypoints,
)

LEVELS = 60 + 2.5 * np.arange(NUM_KEYPOINTS)


def bilinear(img: np.ndarray, x: float, y: float) -> float:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    p = img.astype(np.float64)
    return (
        p[y0, x0] * (1 - fx) * (1 - fy) + p[y0, x0 + 1] * fx * (1 - fy) + p[y0 + 1, x0] * (1 - fx) * fy + p[y0 + 1, x0 + 1] * fx * fy
    )


def assert_dots_under_keypoints(sample: Sample, tol: float = 1.3, flipped: bool = False):
    """Each keypoint sits on the disc drawn for its label (gray level identifies the label; a flip relabels)."""
    levels = LEVELS[list(FLIP_PERMUTATION)] if flipped else LEVELS
    img = sample.image
    if img.dtype != np.uint8:
        img = img * 255.0
    h, w = img.shape[:2]
    checked = 0
    for i, (x, y) in enumerate(sample.keypoints):
        if 1 <= x < w - 2 and 1 <= y < h - 2:
            assert abs(bilinear(img, x, y) - levels[i]) < tol, f"keypoint {i} at ({x:.1f}, {y:.1f}) not on its dot"
            checked += 1
    assert checked >= NUM_KEYPOINTS // 2, "too few keypoints stayed inside the image to check"


def dot_sample(shape=(200, 220)) -> Sample:
    kp = grid_keypoints((shape[1] / 2, shape[0] / 2), spacing=14)
    return Sample(dot_image(kp, shape, radius=4), kp)


GEOMETRIC = {
    "face_crop": [FaceCrop(96, jitter_scale=0.1, jitter_shift=0.05)],
    "rotation": [RandomRotation(40)],
    "scale": [RandomScale(0.8, 1.25)],
    "translate": [RandomTranslate(0.1)],
    "flip": [RandomHorizontalFlip(p=1.0)],
    "all_geometry": [FaceCrop(128, 0.2, 0.1, 0.05), RandomRotation(30), RandomScale(0.9, 1.1), RandomTranslate(0.05), RandomHorizontalFlip(1.0)],
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_transforms_keep_keypoints_on_their_dots(name, seed):
    steps = GEOMETRIC[name]
    out = Compose([*steps, Warp()])(dot_sample(), np.random.default_rng(seed))
    assert not out.pending
    assert_dots_under_keypoints(out, flipped=any(isinstance(t, RandomHorizontalFlip) for t in steps))


def test_flip_relabels_points():
    s = dot_sample()
    out = Compose([RandomHorizontalFlip(1.0), Warp()])(s, np.random.default_rng(0))
    w = s.image.shape[1]
    # the new right eye corner is where the old left one was, mirrored
    assert np.allclose(out.keypoints[RIGHT_EYE_OUTER], [w - 1 - s.keypoints[LEFT_EYE_OUTER][0], s.keypoints[LEFT_EYE_OUTER][1]])
    twice = Compose([RandomHorizontalFlip(1.0), RandomHorizontalFlip(1.0), Warp()])(s, np.random.default_rng(0))
    assert np.allclose(twice.keypoints, s.keypoints, atol=1e-4)
    assert np.array_equal(twice.image, s.image)


def test_flip_permutation_is_an_involution_mapping_eyes():
    perm = np.asarray(FLIP_PERMUTATION)
    assert sorted(perm) == list(range(NUM_KEYPOINTS))
    assert np.array_equal(perm[perm], np.arange(NUM_KEYPOINTS))
    assert set(perm[list(RIGHT_EYE)]) == set(LEFT_EYE)
    assert perm[RIGHT_EYE_OUTER] == LEFT_EYE_OUTER
    # a mirrored frontal face, relabelled, is the same face
    face = mean_face(100, center=(50, 50))
    mirrored = face.copy()
    mirrored[:, 0] = 2 * 50 - mirrored[:, 0]  # mirror about the face centre
    assert np.allclose(mirrored[perm], face, atol=1e-3)


@pytest.mark.parametrize(
    "transform",
    [RandomBrightnessContrast(p=1), RandomBlur(p=1), RandomDownscale(p=1), RandomNoise(p=1), RandomOcclusion(p=1), ToFloat()],
    ids=lambda t: type(t).__name__,
)
def test_photometric_transforms_change_pixels_not_keypoints(transform):
    s = Compose([FaceCrop(96), Warp()])(dot_sample(), np.random.default_rng(0))
    out = transform(s, np.random.default_rng(3))
    assert out.image.shape == s.image.shape
    assert np.array_equal(out.keypoints, s.keypoints)
    assert out.image.dtype == np.float32 and 0 <= out.image.min() and out.image.max() <= 1


def test_crop_and_inverse_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        kp = rng.uniform(20, 300, size=(NUM_KEYPOINTS, 2)).astype(np.float32)
        box = np.array([rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(20, 200), rng.uniform(20, 200)])
        size = int(rng.choice([64, 96, 128]))
        m = crop_matrix(box, size)
        normalized = normalize_keypoints(apply_matrix(m, kp), size)
        assert np.allclose(uncrop_keypoints(normalized, m, size), kp, atol=1e-3)
        assert np.allclose(denormalize_keypoints(normalize_keypoints(kp, size), size), kp, atol=1e-4)


def test_crop_maps_box_centre_to_crop_centre_and_edges_to_minus_one_one():
    box = np.array([40.0, 30.0, 100.0, 100.0])
    size = 96
    m = crop_matrix(box, size, margin=0.0)
    centre = apply_matrix(m, np.array([[90.0, 80.0]]))[0]
    assert np.allclose(centre, [(size - 1) / 2] * 2)
    corners = normalize_keypoints(apply_matrix(m, np.array([[40.0, 30.0], [140.0, 130.0]])), size)
    assert np.allclose(corners, [[-1, -1], [1, 1]], atol=1e-5)


def test_crop_face_pixels_match_keypoints():
    kp = grid_keypoints((150, 120), spacing=10)
    img = dot_image(kp, (260, 300), radius=4)
    box = box_from_keypoints(kp)
    crop, m = crop_face(img, box, 128)
    assert crop.shape == (128, 128)
    assert_dots_under_keypoints(Sample(crop, apply_matrix(m, kp)))


def test_box_from_keypoints_is_square_and_covers_the_face():
    kp = mean_face(100, (200, 150))
    x, y, w, h = box_from_keypoints(kp)
    assert w == pytest.approx(h)
    cx = x + w / 2
    assert cx == pytest.approx((kp[:, 0].min() + kp[:, 0].max()) / 2)
    assert w > np.ptp(kp[:, 0])


def test_train_transform_outputs_model_tensors():
    kp = mean_face(80, (100, 100))
    sample = Sample(dot_image(kp, (200, 200)), kp)
    out = train_transform(96, AugmentConfig())(sample, np.random.default_rng(0))
    image, target = to_tensors(out)
    assert image.shape == (1, 96, 96) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert target.shape == (NUM_KEYPOINTS, 2)
    assert float(target.abs().max()) < 1.5  # on the crop, give or take the augmentation


def test_bad_box_raises():
    with pytest.raises(ValueError, match="positive size"):
        crop_matrix(np.array([0, 0, 0, 0]), 96)
