"""The mirrored pass (fkp_core.mirror): a stand-in network with a known offset, on a mirror-symmetric layout of discs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import copy_model
from fkp_core.constants import FLIP_PERMUTATION, NUM_KEYPOINTS
from fkp_core.landmarks import refined_keypoints
from fkp_core.mirror import fit_mirror_offset, mirrored, unmirror
from fkp_core.transforms import face_frame

SIZE = 112
MARGIN = 0.05  # a crop at about the frame's scale: the discs keep a flat inside
_PERM = np.asarray(FLIP_PERMUTATION)
# one gray level per mirror pair (and per point on the midline): a face's right and left halves look alike
_CLASSES = sorted({min(i, int(_PERM[i])) for i in range(NUM_KEYPOINTS)})
_LEVEL = {i: 40 + 4 * _CLASSES.index(min(i, int(_PERM[i]))) for i in range(NUM_KEYPOINTS)}


def _layout(center: tuple[float, float] = (55.0, 50.0), spacing: float = 9.0) -> np.ndarray:
    """68 points, mirror-symmetric about x = center: each pair's first point on the image's left (the subject's right,
    as in iBUG) in 8 rows of up to 4 a side, the 10 midline points on the axis; about 8 x 8 spacings."""
    pts = np.zeros((NUM_KEYPOINTS, 2), np.float32)
    slots = iter((r, c) for r in range(8) for c in (1, 2, 3, 4))
    rows = iter(range(10))
    cx, cy = center
    for i in range(NUM_KEYPOINTS):
        j = int(_PERM[i])
        if j == i:
            pts[i] = cx, cy + (next(rows) - 4.5) * spacing * 0.8
        elif i < j:
            r, c = next(slots)
            pts[i] = cx - c * spacing, cy + (r - 3.5) * spacing
            pts[j] = cx + c * spacing, cy + (r - 3.5) * spacing
    return pts


def _image(points: np.ndarray, shape=(SIZE, SIZE), radius: int = 3) -> np.ndarray:
    img = np.zeros(shape, np.uint8)
    for i, (x, y) in enumerate(points):
        cv2.circle(img, (int(round(x)), int(round(y))), radius, _LEVEL[i], -1)
    return img


def _network(offset: float):
    """A perfect network that places every point ``offset`` crop units right of its disc: the discs of a pair are told
    apart only by side (the one on the image's left is the pair's first point), as a network tells a face's eyes apart."""

    def predict(crops: np.ndarray) -> np.ndarray:
        out = np.zeros((len(crops), NUM_KEYPOINTS, 2), np.float32)
        s = crops.shape[-1]
        for n, crop in enumerate(crops):
            ys, xs = np.mgrid[: crop.shape[0], : crop.shape[1]]
            for i in range(NUM_KEYPOINTS):
                # a disc's flat inside (a resampled disc's rim passes through other discs' levels)
                mask = cv2.erode((np.abs(crop.astype(np.float32) - _LEVEL[i]) < 1.5).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
                j = int(_PERM[i])
                if j != i:  # the pair's first point on the left half, the other on the right
                    left = xs < (s - 1) / 2
                    mask &= left if i < j else ~left
                x, y = xs[mask].mean(), ys[mask].mean()
                out[n, i] = (x + 0.5) * 2 / s - 1 + offset, (y + 0.5) * 2 / s - 1
        return out

    return predict


def test_unmirror_undoes_a_mirror_image_of_the_points():
    pts = np.random.default_rng(0).uniform(-1, 1, (2, NUM_KEYPOINTS, 3)).astype(np.float32)
    seen = pts[:, _PERM].copy()
    seen[..., 0] *= -1  # the points of the mirrored crop, relabelled
    np.testing.assert_allclose(unmirror(seen), pts, atol=1e-6)  # scores ride along with their points
    np.testing.assert_allclose(unmirror(seen, 0.01)[..., 0], pts[..., 0] + 0.02, atol=1e-6)


def test_the_offset_is_fitted_from_a_face_and_its_mirror_and_puts_the_mirrored_pass_on_the_plain_one():
    crops = np.stack([_image(_layout()), _image(_layout((57.0, 54.0)))])
    offset = 0.03  # about 1.7 px in a 112-px crop
    net = _network(offset)
    assert fit_mirror_offset(net, crops) == pytest.approx(offset, abs=1e-6)
    plain = net(crops)
    np.testing.assert_allclose(mirrored(net, offset)(crops), plain, atol=1e-5)
    # mapped back without the offset, the mirrored pass lands 2 offsets left of the plain one
    np.testing.assert_allclose(mirrored(net, 0.0)(crops)[..., 0], plain[..., 0] - 2 * offset, atol=1e-5)
    assert fit_mirror_offset(_network(0.0), crops) == pytest.approx(0.0, abs=1e-6)


def _disc_face(offset: float):
    """A frame holding the disc layout as a face, its crop box and angle, and :func:`_network` with that offset,
    recording the crops of each call (returned too)."""
    frame = np.zeros((200, 240), np.uint8)
    pts = _layout((120.0, 100.0), spacing=11.0)
    frame[:] = _image(pts, frame.shape, radius=4)
    box, angle = face_frame(pts[None], True)
    calls = []

    def net(crops):
        calls.append(crops.copy())
        return _network(offset)(crops)

    return frame, box, angle, net, calls


def test_the_last_crop_is_also_predicted_on_its_mirror_image_and_the_two_averaged():
    offset = 0.04
    frame, box, angle, net, calls = _disc_face(offset)

    for refine in (1, 0):  # a detected face (re-cropped once), a tracked face (its one crop)
        calls.clear()
        plain, _, _ = refined_keypoints(net, [frame], [box], SIZE, MARGIN, [angle], refine=refine, upright=True)
        assert len(calls) == 1 + refine
        calls.clear()
        both, _, boxes = refined_keypoints(net, [frame], [box], SIZE, MARGIN, [angle], refine=refine, upright=True,
                                           mirror_offset=offset)
        assert len(calls) == 2 + refine  # one more pass: the last crop's mirror image
        np.testing.assert_array_equal(calls[-1], calls[-2][:, :, ::-1])
        # with the model's offset, the average sits where the plain prediction does (resampled discs: within half a pixel)
        np.testing.assert_allclose(both[0], plain[0], atol=0.5)
        assert abs((both[0][0] - plain[0][0])[:, 0].mean()) < 0.15
        # a wrong offset moves every point sideways by half the error
        wrong, _, _ = refined_keypoints(net, [frame], [box], SIZE, MARGIN, [angle], refine=refine, upright=True, mirror_offset=0.0)
        shift = (wrong[0][0] - plain[0][0])[:, 0].mean()
        px_per_unit = (boxes[0][0, 2] * (1 + 2 * MARGIN)) / 2  # the crop's side spans 2 units
        assert shift == pytest.approx(-offset * px_per_unit, rel=0.1)


# ---- the models' offsets, and the jobs ----


def test_a_models_fitted_values_come_from_its_json_with_defaults_for_what_it_lacks():
    from fkp_core.confidence import DEFAULT_FACE_WEIGHTS
    from fkp_core.fitted import ModelFit

    assert ModelFit.from_metadata({}) == ModelFit() == ModelFit(DEFAULT_FACE_WEIGHTS, None)
    fit = ModelFit.from_metadata({"mirror_offset": 0.0125, "face_confidence": {"bias": -3.0, "fit_only": 2.5}})
    assert fit.mirror_offset == 0.0125 and fit.face_weights.bias == -3.0 and fit.face_weights.fit_only == 2.5
    assert fit.face_weights.detector == DEFAULT_FACE_WEIGHTS.detector
    for junk in (True, "0.01", None, [0.01]):
        assert ModelFit.from_metadata({"mirror_offset": junk}).mirror_offset is None
    assert fit.mirrored(True) == fit and fit.mirrored(False) == ModelFit(fit.face_weights, None)


def test_each_bundled_model_carries_the_offset_fitted_with_it_and_the_landmarker_uses_it(tmp_path):
    from fkp_core.landmarks import Landmarker
    from fkp_core.weights import load_model, resolve_model_path

    offsets = {}
    for name in ("default", "hm", "fast", "fastest"):
        meta = json.loads(resolve_model_path(name).with_suffix(".json").read_text())
        assert "--fit-mirror" in meta["mirror_offset_measured"]
        offsets[name] = load_model(name).fit.mirror_offset
        assert offsets[name] == meta["mirror_offset"] and 0 < offsets[name] < 0.05  # about a pixel, to the right
    assert len(set(offsets.values())) == 4
    assert Landmarker("fast").fit.mirror_offset == offsets["fast"]
    assert Landmarker("fast", mirror=False).fit.mirror_offset is None
    bare = copy_model("fast", tmp_path / "bare", mirror_offset=None)
    assert Landmarker(bare).fit.mirror_offset is None  # not fitted: no mirrored pass


def test_the_job_runs_the_mirrored_pass_where_the_model_has_an_offset(tmp_path):
    """The same rows with and without the mirrored pass, the points moved by it; --no-mirror and a model without an
    offset give the plain passes, through the model loaded in the process and through the exported ONNX graph."""
    from fkp_core.annotator import AnnotateConfig
    from fkp_core.onnx_network import export_network, onnx_network
    from fkp_core.segments import AnnotateSettings, annotate_video

    from conftest import PROJECT_ROOT

    sample = str(PROJECT_ROOT / "examples" / "sample.mp4")
    fitted = copy_model("fastest", tmp_path / "fitted")
    bare = copy_model("fastest", tmp_path / "bare", mirror_offset=None)
    runs = {}
    for label, model, mirror in (("mirror", fitted, True), ("off", fitted, False), ("bare", bare, True)):
        settings = AnnotateSettings.for_model(str(model), segment_frames=80, annotate=AnnotateConfig(mirror=mirror))
        table, record = annotate_video(sample, settings=settings)
        assert record.status == "ok" and table.num_rows > 0
        runs[label] = np.stack(table.column("keypoints_raw").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert runs["mirror"].shape == runs["off"].shape
    moved = np.abs(runs["mirror"] - runs["off"]).mean()
    assert 0.05 < moved < 3.0, moved  # a second look at each face: points move by a fraction of a pixel or so
    np.testing.assert_array_equal(runs["off"], runs["bare"])
    exported = export_network(str(fitted))
    if exported is not None:
        assert exported.fit.mirror_offset == onnx_network(exported).fit.mirror_offset == json.loads(fitted.with_suffix(".json").read_text())["mirror_offset"]
        assert export_network(str(bare)).fit.mirror_offset is None


def test_fit_mirror_measures_the_offsets_of_each_source(tmp_path, capsys):
    from conftest import make_course_dataset, make_ibug_dataset
    from jobs import evaluate

    course = make_course_dataset(tmp_path / "course", n=8, people=4)
    helen = make_ibug_dataset(tmp_path / "helen", n=6)
    code = evaluate.main(["--model", "fastest", "--data", f"course:{course}", "--data", f"ibug:{helen}", "--split", "training",
                          "--fit-mirror", "--threads", "1", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    fit = json.loads(out[out.index("{") : out.rindex("}") + 1])
    per = {f["source"]: f for f in fit["per_source"]}
    assert set(per) == {"course", "helen"} and per["course"]["faces"] == 8 and per["helen"]["faces"] == 6
    assert fit["mirror_offset"] == pytest.approx(np.mean([f["mirror_offset"] for f in per.values()]), abs=1e-5)
    assert all(np.isfinite(f["label_offset_px"]) and np.isfinite(f["model_offset_px"]) for f in per.values())
    assert '"mirror_offset":' in out.splitlines()[-1]


def test_the_fits_take_training_faces_only(tmp_path, capsys):
    from conftest import make_course_dataset, make_ibug_dataset
    from jobs import evaluate

    course = make_course_dataset(tmp_path / "course", n=4, people=2, split="test")
    afw = make_ibug_dataset(tmp_path / "afw", n=4)
    for fit in ("--fit-mirror", "--fit-confidence"):
        assert evaluate.main(["--model", "fastest", "--data", f"ibug:{afw}", "--split", "training", fit, "-q"]) == 2
        assert "AFW is for validation only" in capsys.readouterr().err
        assert evaluate.main(["--model", "fastest", "--data", f"course:{course}", fit, "-q"]) == 2
        assert "add --split training" in capsys.readouterr().err
