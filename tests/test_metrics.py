import numpy as np
import pytest

from conftest import mean_face
from fkp_core.metrics import auc, ced, failure_rate, interocular, jaw_along_across, nme, region_nme, summarize


def test_nme_hand_computed():
    gt = np.zeros((68, 2))
    gt[36] = [0, 0]
    gt[45] = [10, 0]  # inter-ocular distance 10
    pred = gt.copy()
    pred[:, 0] += 3  # every point 3 px right... but 36/45 too
    assert interocular(gt)[0] == pytest.approx(10)
    assert nme(pred, gt)[0] == pytest.approx(0.3)
    pred2 = gt.copy()
    pred2[0] += [3, 4]  # one point 5 px off
    assert nme(pred2, gt)[0] == pytest.approx(5 / 68 / 10)


def test_nme_is_invariant_to_similarity_transforms():
    rng = np.random.default_rng(0)
    gt = mean_face(100)
    pred = gt + rng.normal(0, 2, gt.shape)
    a = np.deg2rad(30)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * 2.5
    assert nme(pred @ r.T + 7, gt @ r.T + 7)[0] == pytest.approx(nme(pred, gt)[0])


def test_region_nme_and_summary():
    gt = mean_face(100)[None]
    pred = gt.copy()
    pred[0, 48:68] += [5, 0]  # only the mouth is off
    regions = region_nme(pred, gt)
    assert regions["jaw"] == 0 and regions["eyes"] == 0
    assert regions["mouth"] == pytest.approx(5 / interocular(gt)[0])
    s = summarize(pred, gt)
    assert s["faces"] == 1 and s["nme"] == pytest.approx(5 * 20 / 68 / interocular(gt)[0])


def test_the_jaw_error_splits_along_and_across_its_line():
    gt = mean_face(100)[None].astype(np.float64)
    jaw = gt[0, :17]
    tangent = np.gradient(jaw, axis=0)
    tangent /= np.linalg.norm(tangent, axis=-1, keepdims=True)
    normal = tangent @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # the tangent turned a quarter
    iod = interocular(gt)[0]
    for shift, along, across in ((tangent, 3.0, 0.0), (normal, 0.0, 3.0), ((tangent + normal) / np.sqrt(2), 3 / np.sqrt(2), 3 / np.sqrt(2))):
        pred = gt.copy()
        pred[0, :17] += 3.0 * shift
        pred[0, 17:] += 9.0  # the other points do not count
        split = jaw_along_across(pred, gt)
        assert split["along"] == pytest.approx(along / iod) and split["across"] == pytest.approx(across / iod)
        assert np.hypot(split["along"], split["across"]) == pytest.approx(region_nme(pred, gt)["jaw"])
    assert summarize(pred, gt)["jaw_line"] == split


def test_failure_rate_ced_auc():
    errors = np.array([0.01, 0.02, 0.05, 0.2])
    assert failure_rate(errors, 0.1) == 0.25
    xs, ys = ced(errors, 0.1)
    assert ys[0] == 0 and ys[-1] == 0.75
    assert ys[np.searchsorted(xs, 0.02)] == 0.5
    # AUC = mean of (0.1 - e)+ / 0.1 = (0.09 + 0.08 + 0.05 + 0) / 4 / 0.1
    assert auc(errors, 0.1) == pytest.approx(0.55)
    # numerically integrating the CED agrees
    assert np.trapezoid(ys, xs) / 0.1 == pytest.approx(0.55, abs=2e-3)
    assert auc(np.zeros(3)) == pytest.approx(1.0)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        nme(np.zeros((2, 68, 2)), np.zeros((3, 68, 2)))
