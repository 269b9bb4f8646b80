import numpy as np
import pytest
import torch

from conftest import face_image, mean_face
from fkp_core.detector import HAAR_CALIBRATION, Detections
from fkp_core.landmarks import Faces, Landmarker
from fkp_core.model import build_model
from fkp_core.transforms import box_from_keypoints


class FixedBoxes:
    """A detector that returns given boxes (the protocol, without a real detector), framed as Haar's."""

    calibration = HAAR_CALIBRATION

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.int32).reshape(-1, 4)

    def detect(self, image):
        return Detections.from_boxes(self.boxes)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.mark.parametrize("n", [0, 1, 5])
def test_shapes_for_zero_one_many_faces(tiny_model, n):
    boxes = [[10 + 30 * i, 20, 40, 40] for i in range(n)]
    lm = Landmarker(tiny_model, detector=FixedBoxes(boxes), refine=0)
    faces = lm(np.zeros((120, 200, 3), np.uint8))
    assert isinstance(faces, Faces) and len(faces) == n
    assert faces.boxes.shape == (n, 4) and faces.boxes.dtype == np.int32
    assert faces.keypoints.shape == (n, 68, 2) and faces.keypoints.dtype == np.float32


def test_empty_is_arrays_not_none():
    e = Faces.empty()
    assert e.boxes.shape == (0, 4) and e.keypoints.shape == (0, 68, 2)


def test_batching_many_images_matches_one_by_one(tiny_model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (100 + 10 * i, 150), dtype=np.uint8) for i in range(4)]
    boxes = [np.array([[10, 10, 50, 50], [60, 20, 40, 40]][: i % 3]) for i in range(4)]
    lm = Landmarker(tiny_model, detector=FixedBoxes([]), refine=1)
    together = lm.keypoints_in_boxes(images, boxes)
    for im, b, kp in zip(images, boxes, together):
        alone = lm.keypoints_in_boxes([im], [b])[0]
        assert kp.shape == (len(b), 68, 2)
        assert np.allclose(kp, alone, atol=1e-4)


def test_keypoints_are_mapped_back_to_image_pixels(tiny_model):
    """A model that always predicts the crop's canonical face returns that face where the box is."""
    lm = Landmarker(tiny_model, detector=FixedBoxes([]), refine=0)
    face = mean_face(60, (100, 90))
    box = box_from_keypoints(face)
    from fkp_core.transforms import crop_matrix, normalize_keypoints, apply_matrix

    target = normalize_keypoints(apply_matrix(crop_matrix(box, 64), face), 64)
    lm.predict_crops = lambda crops: np.repeat(target[None], len(crops), 0)
    kp = lm.keypoints_in_boxes([np.zeros((200, 200), np.uint8)], [box[None]])[0]
    assert np.allclose(kp[0], face, atol=1e-3)


def test_bundled_landmarker_on_a_drawn_face():
    from fkp_core.weights import default_model_path

    if not default_model_path().is_file():
        pytest.skip("no bundled model in this checkout yet")
    face = mean_face(110, (160, 130))
    img = face_image(face, (260, 320))
    lm = Landmarker(detector=FixedBoxes(np.round(box_from_keypoints(face))[None]))
    faces = lm(img)
    assert len(faces) == 1 and np.isfinite(faces.keypoints).all()
    # the network has never seen a cartoon, but it must put the face where the face is
    assert np.linalg.norm(faces.keypoints[0].mean(0) - face.mean(0)) < 15


@pytest.mark.data
@pytest.mark.parametrize("degrees", [30, -30])
def test_a_turned_face_gives_the_same_keypoints_turned(real_data, degrees):
    """Upright crops: keypoints of a face turned 30 degrees, turned back, match the upright prediction.

    Tolerance: mean distance under 4% of the inter-ocular distance, in both faces of the photo.
    """
    import cv2

    from fkp_core.dataset import read_image
    from fkp_core.metrics import nme

    img = read_image(real_data / "photos" / "udacity_obamas.jpg")
    pad = 200
    img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    h, w = img.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    turned = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    lm = Landmarker()
    upright, rotated = lm(img), lm(turned)
    assert len(upright) == len(rotated) == 2
    back = (rotated.keypoints - m[:, 2]) @ np.linalg.inv(m[:, :2]).T
    order_u, order_r = np.argsort(upright.keypoints[:, 30, 0]), np.argsort(back[:, 30, 0])
    errors = nme(back[order_r], upright.keypoints[order_u])
    assert errors.max() < 0.04, errors
