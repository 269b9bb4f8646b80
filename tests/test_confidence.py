"""Per-keypoint scores and the face confidence (fkp_core.confidence), on real faces of the bundled sample clip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from conftest import PROJECT_ROOT
from fkp_core.annotator import AnnotateConfig, SegmentAnnotator
from fkp_core.confidence import face_confidence, heatmap_keypoint_scores
from fkp_core.constants import MIN_FACE_CONFIDENCE
from fkp_core.detector import YUNET_CALIBRATION, Detections
from fkp_core.inference import make_predictor
from fkp_core.landmarks import Landmarker
from fkp_core.tables import FACE_SCHEMA, FaceColumns, columns_from_table, faces_table
from fkp_core.transforms import crop_face, face_frame
from fkp_core.video import DecodedFrame, read_frames

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"
TRUTH = PROJECT_ROOT / "examples" / "sample_truth.csv"
MOUTH = slice(48, 68)
FRAMES = (0, 45, 90, 135, 180, 225)  # different people (the sample's shots)


@pytest.fixture(scope="module")
def landmarker():
    return Landmarker()


@pytest.fixture(scope="module")
def faces():
    """(gray frame, truth keypoints) of a few of the sample clip's faces."""
    truth = pd.read_csv(TRUTH).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)
    return [(next(iter(read_frames(SAMPLE, f, f + 1, gray=True))).image, truth[f]) for f in FRAMES]


def _crop(lm, gray, box, angle=0.0):
    return crop_face(gray, box, lm.size, lm.margin, angle)[0]


def _scores(lm, crops):
    out = lm.predict_crops(np.stack(crops))
    assert out.shape == (len(crops), 68, 3)
    return out[..., 2]


def test_occluded_points_score_lower_than_visible(landmarker, faces):
    clean, occluded = [], []
    for gray, kp in faces:
        box, angle = (x[0] for x in face_frame(kp[None], True))
        crop = _crop(landmarker, gray, box, angle)
        pts = (landmarker.predict_crops(crop[None])[0, :, :2] + 1) / 2 * landmarker.size
        x0, y0 = np.floor(pts[MOUTH].min(0) - 3).astype(int)
        x1, y1 = np.ceil(pts[MOUTH].max(0) + 3).astype(int)
        hidden = crop.copy()
        hidden[max(0, y0) : y1, max(0, x0) : x1] = 128  # a flat grey patch over the mouth
        s_clean, s_hidden = _scores(landmarker, [crop, hidden])
        clean.append(s_clean)
        occluded.append(s_hidden)
    clean, occluded = np.array(clean), np.array(occluded)
    # the hidden mouth scores lower than the same mouth visible, face by face (its expected error higher on every
    # face, 1.2x on average: scores are linear in the log of the expected error between the model's sharp and flat
    # ends; the default gives 1.08-1.43x, docs/confidence.md), and far more than the visible brows and eyes (17-47) do
    sharp, flat = landmarker.model.head.score_range
    drop = clean - occluded
    mouth, upper = drop[:, MOUTH].mean(1), drop[:, 17:48].mean(1)
    rise = np.exp(mouth * np.log(flat / sharp))
    assert (rise > 1.05).all() and rise.mean() > 1.15, rise
    assert (mouth > upper).all() and mouth.mean() > 3 * upper.mean(), (mouth, upper)
    assert ((clean >= 0) & (clean <= 1)).all()


def test_face_confidence_separates_faces_from_non_faces(landmarker, faces):
    rng = np.random.default_rng(0)
    real, other = [], []
    for gray, kp in faces:
        box, angle = (x[0] for x in face_frame(kp[None], True))
        real.append(_crop(landmarker, gray, box, angle))
        forehead = box + np.array([0, -0.8 * box[3], 0, 0])  # the crop slid up off the face
        side = box + np.array([0.8 * box[2], 0, 0, 0])  # ... and sideways, over an ear and the background
        other += [_crop(landmarker, gray, forehead), _crop(landmarker, gray, side)]
    size = landmarker.size
    other += [np.full((size, size), 128, np.uint8), np.zeros((size, size), np.uint8), rng.integers(0, 256, (size, size)).astype(np.uint8)]
    scores = _scores(landmarker, real + other)
    fit = scores.mean(1)
    assert fit[: len(real)].min() - fit[len(real) :].max() > 0.2  # the keypoint scores tell them apart
    det = np.full(len(real) + len(other), 0.9)  # the same detector evidence for all: the fit must tell them apart
    conf = face_confidence(det, scores)
    assert conf[: len(real)].min() > 0.9
    # every face above every non-face (the default's weights, fitted on training images where the detector's score
    # separates nearly alone, lean on the keypoint scores less than its former default's did: docs/confidence.md)
    assert conf[: len(real)].min() - conf[len(real) :].max() > 0.05
    # a detector without scores (Haar): the confidence alone keeps every face and drops every non-face
    haar = face_confidence(np.full(len(det), np.nan), scores)
    assert haar[: len(real)].min() > 0.5 and haar[len(real) :].max() < MIN_FACE_CONFIDENCE


def test_scores_leave_keypoints_unchanged_and_export_to_onnx(landmarker, faces):
    gray, kp = faces[0]
    box, angle = (x[0] for x in face_frame(kp[None], True))
    crop = _crop(landmarker, gray, box, angle)[None]
    plain = make_predictor(landmarker.model, "cpu", "torch")(crop)
    scored = make_predictor(landmarker.model, "cpu", "torch", scores=True)(crop)
    onnx = make_predictor(landmarker.model, "cpu", "onnx", scores=True)(crop)
    assert plain.shape == (1, 68, 2) and scored.shape == onnx.shape == (1, 68, 3)
    np.testing.assert_allclose(scored[..., :2], plain, atol=1e-6)
    np.testing.assert_allclose(onnx, scored, atol=1e-4)


def test_heatmap_scores_torch_and_numpy_agree():
    var = np.array([1e-4, 0.05, 0.13, 0.3, 2.0])
    a = heatmap_keypoint_scores(var)
    b = heatmap_keypoint_scores(torch.tensor(var)).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[0] == 1 and a[-1] == 0 and (np.diff(a) <= 0).all()


def _columns(n: int, scores: np.ndarray | None) -> FaceColumns:
    rng = np.random.default_rng(1)
    return FaceColumns(
        frame_index=np.arange(n, dtype=np.int64), timestamp_s=np.arange(n) / 25.0, face_index=np.zeros(n, np.int32),
        track_id=np.zeros(n, np.int64), boxes=np.ones((n, 4), np.int32), detected=np.ones(n, bool),
        confidence=np.full(n, 0.9, np.float32), keypoints=rng.random((n, 68, 2), np.float32),
        keypoints_raw=rng.random((n, 68, 2), np.float32), pose=np.zeros((n, 3), np.float32), keypoint_scores=scores,
    )


def test_keypoint_scores_round_trip_and_old_files():
    scores = np.random.default_rng(2).random((5, 68)).astype(np.float32)
    table = faces_table("v", "v.mp4", _columns(5, scores))
    assert table.schema.field("keypoint_scores").type == pa.list_(pa.float32(), 68)
    np.testing.assert_array_equal(columns_from_table(table).keypoint_scores, scores)
    old = table.drop_columns(["keypoint_scores"])  # a part file written before the column existed
    assert np.isnan(columns_from_table(old).keypoint_scores).all()
    assert FACE_SCHEMA.field("keypoint_scores").nullable is False
    assert np.isnan(FaceColumns.concat([_columns(2, None), _columns(3, scores[:3])]).keypoint_scores[:2]).all()


class _FixedDetector:
    """Finds the given crop boxes on every frame, with one detector score (``scored`` False: a detector
    without scores, as Haar)."""

    calibration = YUNET_CALIBRATION

    def __init__(self, boxes, score: float, scored: bool = True):
        self.boxes = np.asarray(boxes, np.float32)
        self.score = score
        self.scored = scored

    def detect(self, image):
        # YuNet's calibration centres its crop on the box, scaled: hand it the boxes whose crops are these
        c = YUNET_CALIBRATION
        side = self.boxes[:, 2] / np.float32(c.scale)
        cx = self.boxes[:, 0] + self.boxes[:, 2] / 2 - c.shift_x * side
        cy = self.boxes[:, 1] + self.boxes[:, 3] / 2 - c.shift_y * side
        boxes = np.stack([cx - side / 2, cy - side / 2, side, side], axis=1)
        d = Detections.from_boxes(boxes)
        return Detections(d.boxes, np.full(len(d), self.score, np.float32), d.points)


@pytest.mark.parametrize("score,scored", [(0.85, True), (1.0, False)])  # 0.85: within YuNet's scores on ears and backs of heads
@pytest.mark.parametrize("k", [1, 2])
def test_threshold_drops_a_false_face(landmarker, faces, score, scored, k):
    gray, kp = faces[0]
    box = face_frame(kp[None], False)[0][0]
    side = int(box[2])
    canvas = gray.copy()
    canvas[: side + 2, -side - 2 :] = 100  # a flat patch in the top right corner ...
    blank = np.array([gray.shape[1] - side - 1, 0, side, side], np.float32)  # ... that the detector calls a face
    frames = [DecodedFrame(i, i / 25.0, canvas) for i in range(3)]
    det = _FixedDetector([box, blank], score, scored)

    def run(min_conf):
        cfg = AnnotateConfig(detect_every=k, upright=False, min_face_confidence=min_conf)
        return SegmentAnnotator(landmarker.predict_crops, landmarker.size, landmarker.margin, det, cfg).run(frames)

    every, kept = run(0.0), run(MIN_FACE_CONFIDENCE)
    assert len(every) == 2 * len(frames)
    assert len(kept) == len(frames)
    assert (kept.boxes[:, 0] < gray.shape[1] / 2).all()  # the real face, on the left
    assert (kept.confidence >= MIN_FACE_CONFIDENCE).all()
    assert kept.keypoint_scores.shape == (len(frames), 68) and np.isfinite(kept.keypoint_scores).all()


# ---- per-model face-confidence weights ----


def test_each_bundled_model_carries_the_weights_fitted_with_its_scores():
    """The mean keypoint score is on each model's own scale: hm, fast and fastest carry their own weights, the
    default the package's constants (fitted with it)."""
    import json

    from fkp_core.confidence import DEFAULT_FACE_WEIGHTS, FaceConfidenceWeights
    from fkp_core.weights import load_model, resolve_model_path

    assert load_model("default").fit.face_weights == DEFAULT_FACE_WEIGHTS
    seen = set()
    for name in ("hm", "fast", "fastest"):
        fitted = json.loads(resolve_model_path(name).with_suffix(".json").read_text())["face_confidence"]
        weights = load_model(name).fit.face_weights
        assert weights == FaceConfidenceWeights(**{k: fitted[k] for k in ("bias", "detector", "fit", "fit_only_bias", "fit_only")})
        assert weights != DEFAULT_FACE_WEIGHTS and "--fit-confidence" in fitted["measured"]
        seen.add(weights)
    assert len(seen) == 3
    assert Landmarker("fast").fit.face_weights == load_model("fast").fit.face_weights


def test_the_job_scores_faces_with_the_models_own_weights(tmp_path):
    """A model whose weights call nothing a face writes no rows, through both ways a job runs the network
    (the model loaded in the process, and the ONNX graph exported once for the annotators)."""
    from conftest import copy_model
    from fkp_core.onnx_network import export_network, onnx_network
    from fkp_core.segments import AnnotateSettings, annotate_video
    from fkp_core.weights import load_model

    copy_model("fast", tmp_path / "m")
    fitted = load_model("fast").metadata["face_confidence"]
    copy_model("fast", tmp_path / "never", face_confidence={**fitted, "bias": -60.0, "fit_only_bias": -60.0})
    for name, rows in (("m", True), ("never", False)):
        settings = AnnotateSettings.for_model(str(tmp_path / f"{name}.pt"), segment_frames=60)
        table, record = annotate_video(str(SAMPLE), settings=settings)
        assert record.status == "ok" and (table.num_rows > 0) == rows, (name, table.num_rows)
        exported = export_network(str(tmp_path / f"{name}.pt"))
        if exported is not None:
            assert onnx_network(exported).fit == exported.fit
            assert (exported.fit.face_weights.bias == -60.0) == (not rows)
