import cv2
import numpy as np
import pytest

from fkp_core.dataset import read_image
from fkp_core.detector import FaceDetector, HaarConfig, HaarDetector, iou


def test_no_face_on_blank_and_noise():
    det = HaarDetector()
    for img in (np.zeros((240, 320), np.uint8), np.full((240, 320, 3), 255, np.uint8),
                np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8)):
        boxes = det.detect(img)
        assert boxes.shape == (0, 4) and boxes.dtype == np.int32


def test_tiny_and_float_inputs():
    det = HaarDetector()
    assert det.detect(np.zeros((5, 5), np.uint8)).shape == (0, 4)
    assert det.detect(np.zeros((100, 100), np.float32)).shape == (0, 4)


def test_protocol_and_pickling():
    import pickle

    det = HaarDetector(HaarConfig(min_neighbors=3))
    assert isinstance(det, FaceDetector)
    clone = pickle.loads(pickle.dumps(det))
    assert clone.config == det.config


def test_config_validation():
    with pytest.raises(ValueError):
        HaarConfig(downscale=0)
    with pytest.raises(ValueError):
        HaarConfig(scale_factor=1.0)
    with pytest.raises(FileNotFoundError):
        HaarDetector(HaarConfig(cascades=("no_such_cascade.xml",)))


def test_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5]])
    assert np.allclose(iou(a, b), [[1.0, 50 / 150, 0.0]])


def test_finds_the_faces_of_a_real_photo(real_data):
    img = read_image(real_data / "photos" / "udacity_obamas.jpg", color=True)
    det = HaarDetector()
    boxes = det.detect(img)
    assert len(boxes) == 2
    # same faces from gray input, and from a half-size detection pass mapped back
    assert np.array_equal(det.detect(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)), boxes)
    half = HaarDetector(HaarConfig(downscale=0.5)).detect(img)
    assert len(half) == 2
    assert iou(half, boxes).max(axis=1).min() > 0.6


def test_finds_the_beatles(real_data):
    img = read_image(real_data / "photos" / "udacity_the_beatles.jpg", color=True)
    boxes = HaarDetector(HaarConfig(downscale=0.25, min_size=200)).detect(img)
    big = boxes[boxes[:, 2] > 250]
    assert len(big) == 4


def test_mirrored_profile_cascade_maps_boxes_back(real_data):
    img = read_image(real_data / "photos" / "udacity_obamas.jpg")
    cfg = HaarConfig(cascades=("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml"),
                     mirror=("haarcascade_profileface.xml",))
    boxes = HaarDetector(cfg).detect(img)
    assert len(boxes) >= 2
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= img.shape[1]).all()
