import cv2
import numpy as np
import pytest

from fkp_core.dataset import read_image
from fkp_core.detector import (
    HAAR_CALIBRATION,
    YUNET_CALIBRATION,
    BoxCalibration,
    Detections,
    DetectorSpec,
    FaceDetector,
    HaarConfig,
    HaarDetector,
    YuNetConfig,
    YuNetDetector,
    effective_min_face,
    iou,
    make_detector,
)
from fkp_core.transforms import face_frame


def test_no_face_on_blank_and_noise():
    det = HaarDetector()
    for img in (np.zeros((240, 320), np.uint8), np.full((240, 320, 3), 255, np.uint8),
                np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8)):
        boxes = det.detect_boxes(img)
        assert boxes.shape == (0, 4) and boxes.dtype == np.int32
        assert len(det.detect(img)) == 0


def test_tiny_and_float_inputs():
    det = HaarDetector()
    assert det.detect_boxes(np.zeros((5, 5), np.uint8)).shape == (0, 4)
    assert det.detect_boxes(np.zeros((100, 100), np.float32)).shape == (0, 4)


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
    boxes = det.detect_boxes(img)
    assert len(boxes) == 2
    # same faces from gray input, and from a half-size detection pass mapped back
    assert np.array_equal(det.detect_boxes(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)), boxes)
    half = HaarDetector(HaarConfig(downscale=0.5)).detect_boxes(img)
    assert len(half) == 2
    assert iou(half, boxes).max(axis=1).min() > 0.6


def test_finds_the_beatles(real_data):
    img = read_image(real_data / "photos" / "udacity_the_beatles.jpg", color=True)
    boxes = HaarDetector(HaarConfig(downscale=0.25, min_size=200)).detect_boxes(img)
    big = boxes[boxes[:, 2] > 250]
    assert len(big) == 4


def test_mirrored_profile_cascade_maps_boxes_back(real_data):
    img = read_image(real_data / "photos" / "udacity_obamas.jpg")
    cfg = HaarConfig(cascades=("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml"),
                     mirror=("haarcascade_profileface.xml",))
    boxes = HaarDetector(cfg).detect_boxes(img)
    assert len(boxes) >= 2
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= img.shape[1]).all()


# ---- YuNet, the protocol, the calibration ----


def test_every_detector_gives_empty_arrays_on_blank_and_noise():
    blank, white = np.zeros((240, 320), np.uint8), np.full((240, 320, 3), 255, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8)
    for spec in (DetectorSpec(), DetectorSpec(name="fast"), DetectorSpec(name="recall")):
        det = make_detector(spec)
        assert isinstance(det, FaceDetector)
        for img in (blank, white, noise, np.zeros((1, 1), np.uint8), np.zeros((0, 0, 3), np.uint8)):
            d = det.detect(img)
            assert len(d) == 0
            assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.points.shape == (0, 5, 2)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("gray", [False, True])
def test_yunet_finds_the_faces_of_real_photos_at_any_size(real_data, scale, gray):
    det = YuNetDetector()
    for name, faces in (("udacity_obamas.jpg", 2), ("udacity_the_beatles.jpg", 4), ("facenet_multiface.jpg", 6)):
        img = read_image(real_data / "photos" / name, color=not gray)
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        found = det.detect(img)
        assert len(found) == faces, (name, scale, gray, found.scores)
        assert (found.scores >= det.config.score_threshold).all()
        # eye points inside their box, the subject's right eye on the image's left
        x, y, w, h = found.boxes.T
        eyes = found.points[:, :2]
        assert ((eyes[..., 0] >= x[:, None]) & (eyes[..., 0] <= (x + w)[:, None])).all()
        assert (eyes[:, 0, 0] < eyes[:, 1, 0]).all()


def test_yunet_detection_scale_follows_min_face_not_the_frame():
    det = YuNetDetector(YuNetConfig(min_face=64))
    big, small = det.scale_for((1080, 1920)), det.scale_for((720, 1280))
    assert big == small < 1  # the same scale for any frame large enough: cost follows the frame area at that scale
    assert det.scale_for((120, 160)) == 1.0  # a small frame is searched at full size
    assert effective_min_face((1080, 1920), 64) == 64
    assert effective_min_face((100, 150), 64) == 100 / 8
    assert YuNetDetector(YuNetConfig(min_face=32)).scale_for((1080, 1920)) == pytest.approx(2 * big)


def test_yunet_pickles_and_validates():
    import pickle

    det = YuNetDetector(YuNetConfig(score_threshold=0.7))
    assert pickle.loads(pickle.dumps(det)).config == det.config
    with pytest.raises(ValueError):
        YuNetConfig(score_threshold=1.5)
    with pytest.raises(ValueError):
        DetectorSpec(name="nope")
    with pytest.raises(FileNotFoundError):
        YuNetDetector(YuNetConfig(model="/no/such/model.onnx"))


@pytest.mark.parametrize("degrees", [0.0, 30.0, -75.0])
def test_calibration_maps_a_detector_box_onto_the_crop_box(degrees):
    """Exact arithmetic: a box placed by the inverse calibration comes back as the crop box, turned by the eyes."""
    cal = BoxCalibration(scale=1.25, shift_x=0.03, shift_y=-0.1, side="width")
    angle = np.radians(degrees)
    crop_side, centre = 100.0, np.array([200.0, 150.0])
    det_w, det_h = crop_side / cal.scale, 1.3 * crop_side / cal.scale
    c, s = np.cos(angle), np.sin(angle)
    offset = np.array([c * cal.shift_x - s * cal.shift_y, s * cal.shift_x + c * cal.shift_y]) * det_w
    det_centre = centre - offset
    eyes = det_centre + np.array([[-c, -s], [c, s]]) * 20
    points = np.concatenate([eyes, np.full((3, 2), np.nan)])[None].astype(np.float32)
    d = Detections(np.array([[det_centre[0] - det_w / 2, det_centre[1] - det_h / 2, det_w, det_h]], np.float32),
                   np.ones(1, np.float32), points)
    boxes, angles = cal.crop_regions(d, upright=True)
    np.testing.assert_allclose(boxes[0], [150, 100, 100, 100], atol=1e-3)
    assert angles[0] == pytest.approx(angle)
    _, flat = cal.crop_regions(d, upright=False)
    assert flat[0] == 0.0


def test_yunet_boxes_give_the_training_crop_on_training_faces(real_data):
    """The calibration round trip on real training faces (the ones it was measured on: course training set).

    Tolerance: the crop box from a YuNet box lies within 6% of its side of the crop box the model
    was trained on (face_frame of the ground truth), in median, and its side within 6%.
    """
    from fkp_core.dataset import parse_source

    records = parse_source(f"course:{real_data / 'fkp'}").read("training")[::40]
    det = YuNetDetector()
    centre_err, side_err = [], []
    for r in records:
        truth = face_frame(r.keypoints, upright=True)[0]
        boxes, _ = det.calibration.crop_regions(det.detect(read_image(r.image_path)), upright=True)
        if not len(boxes):
            continue
        best = boxes[int(np.argmax(iou(boxes, truth[None])[:, 0]))]
        centre_err.append(np.hypot(*(best[:2] + best[2:] / 2 - truth[:2] - truth[2:] / 2)) / truth[2])
        side_err.append(abs(best[2] / truth[2] - 1))
    assert len(centre_err) >= 0.98 * len(records)
    assert np.median(centre_err) < 0.06 and np.median(side_err) < 0.06
    assert HaarDetector.calibration == HAAR_CALIBRATION and det.calibration == YUNET_CALIBRATION
