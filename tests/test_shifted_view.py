"""The shifted view (fkp_core.shifted_view): stand-in networks on the disc layout of test_mirror, one that snaps to a grid,
and the jobs with --shifted-view."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PROJECT_ROOT, copy_model
from fkp_core.constants import NUM_KEYPOINTS, SHIFTED_VIEW_PIXELS
from fkp_core.landmarks import refined_keypoints
from fkp_core.shifted_view import shift_crops, with_shifted_view
from test_mirror import SIZE, _disc_face, _image, _layout, _network

MARGIN = 0.15  # room for the shifted crop: no disc leaves it


def test_shift_crops_moves_the_content_right_and_down_and_repeats_the_top_and_left_edges():
    crops = np.zeros((2, 16, 16), np.uint8)
    crops[0, 5, 7] = 200
    crops[1, 0, :] = 9  # the top row
    crops[1, :, 0] = 30  # the left column (and the corner)
    out = shift_crops(crops, 4)
    assert out.shape == crops.shape and out.dtype == crops.dtype
    assert out[0, 9, 11] == 200 and out[0].sum() == 200
    np.testing.assert_array_equal(out[1, :5, 5:], 9)  # the top row, repeated into the new strip
    np.testing.assert_array_equal(out[1, 4:, :5], 30)  # the left column too
    np.testing.assert_array_equal(out[1, 5:, 5:], crops[1, 1:12, 1:12])


def test_a_shift_equivariant_network_gives_the_same_points_with_the_shifted_view():
    crops = np.stack([_image(_layout()), _image(_layout((57.0, 54.0)))])
    calls = []

    def net(batch):
        calls.append(len(batch))
        points = _network(0.0)(batch)
        scores = np.where(np.arange(len(batch)) < len(crops), 0.9, 0.1)  # the shifted crops' scores differ
        return np.concatenate([points, np.broadcast_to(scores[:, None, None], (len(batch), NUM_KEYPOINTS, 1))], axis=-1)

    plain = net(crops)
    calls.clear()
    both = with_shifted_view(net, SHIFTED_VIEW_PIXELS)(crops)
    assert calls == [2 * len(crops)]  # one CNN call for both looks
    np.testing.assert_allclose(both[..., :2], plain[..., :2], atol=1e-5)  # the shifted look's points mapped back
    np.testing.assert_allclose(both[..., 2], 0.9, rtol=1e-6)  # the scores are the unshifted crop's
    assert with_shifted_view(net, 4)(crops[:0]).shape[0] == 0
    with pytest.raises(ValueError):
        with_shifted_view(net, 0)


def test_the_shifted_view_averages_away_an_error_tied_to_the_pixel_grid():
    """A network that puts each point at the centre of its 8-pixel cell is off by up to half a cell; the look half a cell
    over snaps the other way, and the mean of the two is off by half as much on average."""
    size, cell = 64, 8
    rng = np.random.default_rng(0)
    truth = rng.uniform(12, 50, (200, NUM_KEYPOINTS, 2))
    crops = np.zeros((len(truth), size, size), np.uint8)

    def snapping(batch):
        # where the content of each crop was moved to (its one marked pixel) tells how far the truth moved
        moved = np.stack([np.argwhere(c == 255)[0][::-1] for c in batch]).astype(float)
        idx = np.arange(len(batch)) % len(truth)
        pts = truth[idx] + (moved - base[idx])[:, None, :]
        snapped = (np.floor(pts / cell) + 0.5) * cell
        return ((snapped + 0.5) * 2 / size - 1).astype(np.float32)

    crops[:, 2, 2] = 255
    base = np.full((len(truth), 2), 2.0)
    def to_px(points: np.ndarray) -> np.ndarray:
        return (points + 1) / 2 * size - 0.5

    one = np.abs(to_px(snapping(crops)) - truth).mean()
    two = np.abs(to_px(with_shifted_view(snapping, cell // 2)(crops)) - truth).mean()
    assert one == pytest.approx(cell / 4, rel=0.1)  # uniform over the cell: a quarter cell on average
    assert two == pytest.approx(cell / 8, rel=0.15)


def test_the_last_crop_gets_the_shifted_view_on_top_of_the_mirrored_pass():
    offset = 0.04
    frame, box, angle, net, calls = _disc_face(offset)

    both, _, _ = refined_keypoints(net, [frame], [box], SIZE, MARGIN, [angle], refine=1, upright=True, mirror_offset=offset)
    calls.clear()
    four, _, _ = refined_keypoints(net, [frame], [box], SIZE, MARGIN, [angle], refine=1, upright=True, mirror_offset=offset,
                                   shift_pixels=SHIFTED_VIEW_PIXELS)
    assert [len(c) for c in calls] == [1, 2, 2]  # the first crop; then the last one and its shifted copy, plain and mirrored
    np.testing.assert_array_equal(calls[1][1], shift_crops(calls[1][:1], SHIFTED_VIEW_PIXELS)[0])
    np.testing.assert_array_equal(calls[2], calls[1][:, :, ::-1])
    # a network that finds every disc wherever it is: the two extra looks land where the first two did
    np.testing.assert_allclose(four[0], both[0], atol=0.5)


def test_the_job_runs_the_shifted_view_when_asked(tmp_path):
    """The same faces with and without --shifted-view, the points moved by a fraction of a pixel; the settings say so."""
    from fkp_core.annotator import AnnotateConfig
    from fkp_core.segments import AnnotateSettings, annotate_video

    sample = str(PROJECT_ROOT / "examples" / "sample.mp4")
    model = copy_model("fastest", tmp_path / "m")
    runs, keys = {}, {}
    for shifted in (False, True):
        settings = AnnotateSettings.for_model(str(model), segment_frames=80, annotate=AnnotateConfig(shifted_view=shifted))
        table, record = annotate_video(sample, settings=settings)
        assert record.status == "ok" and table.num_rows > 0
        runs[shifted] = np.stack(table.column("keypoints_raw").to_numpy(zero_copy_only=False)).astype(np.float32)
        keys[shifted] = settings.plan_key([])
    assert runs[True].shape == runs[False].shape
    moved = np.abs(runs[True] - runs[False]).mean()
    assert 0.05 < moved < 3.0, moved
    assert keys[True] != keys[False]  # work in progress made without it is redone


def test_evaluate_with_the_shifted_view_reports_it_and_averages_the_two_looks(tmp_path):
    from conftest import make_ibug_dataset

    from fkp_core.dataset import read_ibug, read_image
    from fkp_core.landmarks import Landmarker
    from fkp_core.transforms import box_from_keypoints, to_gray
    from jobs import evaluate

    data = make_ibug_dataset(tmp_path / "faces", n=4)
    model = copy_model("fastest", tmp_path / "m", mirror_offset=None)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(model), "--data", f"ibug:{data}", "--refine", "0", "--no-upright", "--shifted-view",
                          "--threads", "1", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shifted_view"] == SHIFTED_VIEW_PIXELS
    # the same protocol by hand: each face's keypoint-box crop and the crop shifted, the points averaged
    lm = Landmarker(model, refine=0, upright=False)
    errors = []
    for rec in read_ibug(data):
        gray = [to_gray(read_image(rec.image_path))]
        box = [box_from_keypoints(rec.keypoints)[None]]
        pred = refined_keypoints(with_shifted_view(lm.predict_crops, SHIFTED_VIEW_PIXELS), gray, box, lm.size, lm.margin,
                                 None, 0, False)[0][0][0]
        errors.append(np.linalg.norm(pred - rec.keypoints, axis=1).mean() / np.linalg.norm(rec.keypoints[36] - rec.keypoints[45]))
    assert report["sources"][data.name]["gt_box"]["nme"] == pytest.approx(float(np.mean(errors)), rel=1e-4)
