"""jobs.annotate and jobs.evaluate detect with one configuration: the same faces in the same images."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from fkp_core.dataset import parse_source, read_image
from jobs import annotate
from jobs.common import detector_spec
from jobs.evaluate import build_parser as evaluate_parser
from jobs.evaluate import find_faces

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.data]


def _annotated_boxes(out) -> dict[str, np.ndarray]:
    df = pd.read_parquet(out)
    return {p: np.sort(g[["box_x", "box_y", "box_w", "box_h"]].to_numpy(), axis=0) for p, g in df.groupby("video_path")}


def test_annotate_and_evaluate_find_the_same_faces(tmp_path, real_data):
    """Course test images of every size (small ones included) and a group photo, as a folder through the job."""
    from fkp_core.landmarks import Landmarker
    from fkp_core.detector import make_detector

    records = parse_source(f"course:{real_data / 'fkp'}").read("test")
    by_size = sorted(records, key=lambda r: min(read_image(r.image_path).shape))
    picks = by_size[:4] + by_size[len(by_size) // 2 : len(by_size) // 2 + 3] + by_size[-3:]
    folder = tmp_path / "images"
    folder.mkdir()
    for r in picks:
        shutil.copy(r.image_path, folder / r.image_path.name)
    shutil.copy(real_data / "photos" / "udacity_the_beatles.jpg", folder / "beatles.jpg")
    assert annotate.main([str(folder), "--out", str(tmp_path / "out"), "-q"]) == 0
    found = _annotated_boxes(tmp_path / "out")

    args = evaluate_parser().parse_args([])  # evaluate's defaults
    lm = Landmarker(detector=make_detector(detector_spec(args)), upright=not args.no_upright)
    for path in sorted(folder.iterdir()):
        boxes, _ = find_faces(lm, read_image(path))
        expected = np.sort(np.round(boxes).astype(np.int32), axis=0)
        got = found.get(str(path), np.zeros((0, 4), np.int32))
        assert got.shape == expected.shape, path.name
        np.testing.assert_allclose(got, expected, atol=1, err_msg=path.name)
    assert len(found[str(folder / "beatles.jpg")]) == 4
    assert all(len(found.get(str(folder / r.image_path.name), [])) >= 1 for r in picks)


def test_the_detector_flag_reaches_the_segment_tasks(tmp_path, real_data):
    """Faces turned 30 degrees in the frame: the Haar cascade (frontal, upright) misses them, YuNet does not."""
    img = read_image(real_data / "photos" / "udacity_obamas.jpg", color=True)
    h, w = img.shape[:2]
    turned = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 30, 0.8), (w, h), borderMode=cv2.BORDER_REPLICATE)
    cv2.imwrite(str(tmp_path / "turned.jpg"), turned)
    counts = {}
    for name in ("yunet", "fast"):
        assert annotate.main([str(tmp_path / "turned.jpg"), "--out", str(tmp_path / name), "--detector", name, "-q"]) in (0, 1)
        counts[name] = len(pd.read_parquet(tmp_path / name)) if list((tmp_path / name).glob("part-*.parquet")) else 0
    assert counts["yunet"] == 2 and counts["fast"] == 0
