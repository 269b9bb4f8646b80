import numpy as np

from conftest import mean_face
from fkp_core.metrics import ced
from fkp_core.model import build_model
from fkp_core.viz import ced_plot, conv_filters_and_maps, draw_keypoints, sample_grid, write_png


def test_draw_keypoints_marks_pixels_at_keypoints():
    img = np.zeros((120, 120), np.uint8)
    kp = mean_face(80, (60, 60))
    out = draw_keypoints(img, kp, color=(0, 255, 0), contours=False)
    assert out.shape == (120, 120, 3)
    for x, y in kp.round().astype(int):
        assert out[y, x, 1] > 100
    assert out[2, 2].sum() == 0
    assert img.sum() == 0  # input untouched


def test_grid_filters_and_ced(tmp_path):
    imgs = [np.full((50, 60), 100, np.uint8) for _ in range(7)]
    kps = [mean_face(30, (30, 25)) for _ in range(7)]
    grid = sample_grid(imgs, kps, kps, labels=[str(i) for i in range(7)], columns=3, tile=64)
    assert grid.shape[0] > 3 * 64 and grid.shape[1] > 3 * 64
    model = build_model("tiny").eval()
    pic = conv_filters_and_maps(model, np.random.default_rng(0).random((64, 64), dtype=np.float32))
    assert pic.ndim == 3 and pic.shape[1] > 0
    plot = ced_plot({"a": ced(np.array([0.01, 0.05])), "b": ced(np.array([0.02]))})
    assert plot.shape == (440, 640, 3)
    assert write_png(tmp_path / "x" / "p.png", plot).is_file()
