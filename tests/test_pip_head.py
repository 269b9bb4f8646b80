"""fkp_core.pip_head: heatmaps read at their peak with offsets and neighbours' votes (PIPNet); jobs.train --head pip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fkp_core.model import HeatmapHead, ModelConfig, build_model
from fkp_core.pip_head import PipMaps, mean_shape, neighbour_table, pip_loss
from fkp_core.training import TrainConfig, initial_model
from fkp_core.weights import save_model

RNG = np.random.default_rng(0)
SHAPES = RNG.uniform(-0.6, 0.6, (8, 68, 2))
TABLE = neighbour_table(mean_shape(SHAPES), 4)


def _pip(size: int = 64, head: str = "pip", **kw):
    torch.manual_seed(0)
    return build_model("mnv2", input_size=size, head=head, pip_neighbours=TABLE, **kw).eval()


def test_neighbours_are_the_nearest_other_points():
    shape = np.stack([np.arange(68, dtype=float), np.zeros(68)], axis=1)  # points on a line, 1 apart
    table = np.array(neighbour_table(shape, 2)).reshape(68, 2)
    assert table[0].tolist() == [1, 2] and table[67].tolist() == [66, 65]
    assert sorted(table[10].tolist()) == [9, 11]
    assert not (table == np.arange(68)[:, None]).any()
    scaled = mean_shape(np.stack([shape, 3 * shape + 5]))  # each shape centred and scaled first: the same shape
    np.testing.assert_allclose(scaled, mean_shape(shape[None]))


class _Planted(torch.nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *_) -> torch.Tensor:
        return self.value


def _planted(net, targets: torch.Tensor, peak_offset: tuple[int, int] = (0, 0)) -> PipMaps:
    """Cell logits peaked at each target's cell (moved by ``peak_offset`` cells), features a constant 1, and read-out
    biases that hold the exact offsets from that cell: a read-out that is right about every point."""
    head = net.head
    w = net.config.input_size // net.config.heatmap_stride
    u = (targets[0] + 1) * (w / 2)  # (68, 2) in cells
    cell = (u.floor() + torch.tensor(peak_offset)).clamp(0, w - 1)
    logits = torch.full((1, 68, w, w), -20.0)
    logits[0, torch.arange(68), cell[:, 1].long(), cell[:, 0].long()] = 20.0
    centre = cell + 0.5
    with torch.no_grad():
        head.offset.weight.zero_()
        head.nb.weight.zero_()
        head.offset.bias.copy_((u - centre).flatten())
        head.nb.bias.copy_((u[head.table] - centre[:, None]).flatten())
    features = torch.ones(1, head.offset.in_channels, w, w)
    head.features = lambda stages: features  # the decoder's output, planted
    head.cells = _Planted(logits)
    return PipMaps(logits, features)


@pytest.mark.parametrize("peak_offset", [(0, 0), (1, -1)])
def test_a_right_read_out_gives_the_points_and_no_offset_loss(peak_offset):
    net = _pip()
    targets = torch.from_numpy(SHAPES[:1]).float()
    maps = _planted(net, targets, peak_offset)
    got = net.head([])
    torch.testing.assert_close(got, targets, atol=1e-5, rtol=0)
    # dual: the mean of that and the soft-argmax of the heatmaps, here all of one cell's mass at that cell's centre
    dual = _pip(head="dual")
    _planted(dual, targets, peak_offset)
    dual.head.out = _Planted(torch.full((1, 68, 8, 8), -30.0).index_put_((torch.tensor([0]), torch.tensor([5]), torch.tensor([2]),
                                                                           torch.tensor([3])), torch.tensor(30.0)))
    want = targets.clone()
    want[0, 5] = (targets[0, 5] + torch.tensor([(3 + 0.5) / 4 - 1, (2 + 0.5) / 4 - 1])) / 2
    torch.testing.assert_close(dual.head([])[:, 5:6], want[:, 5:6], atol=1e-5, rtol=0)
    # with the peak on the point's own cell, the offsets' losses vanish and only the (tiny) cross-entropy is left
    if peak_offset == (0, 0):
        assert pip_loss(maps, targets, net.head, class_weight=1.0, radius=0) < 1e-4
    # offsets trained around the cell (radius 1) disagree with biases that are right for one cell only
    assert pip_loss(maps, targets, net.head, class_weight=0.0, radius=1) > 0.1


def test_a_read_out_off_by_a_cell_costs_what_it_is_off():
    net = _pip()
    targets = torch.from_numpy(SHAPES[:1]).float()
    maps = _planted(net, targets)
    with torch.no_grad():
        net.head.offset.bias += 0.5  # every point half a cell right and down
    got = net.head([])
    cell = 2.0 / (net.config.input_size // net.config.heatmap_stride)
    own_share = 1.0 / net.head._voters  # each point's own estimate is one of its votes
    torch.testing.assert_close(got - targets, (0.5 * cell * own_share)[None, :, None].expand(1, 68, 2), atol=1e-5, rtol=0)
    assert pip_loss(maps, targets, net.head, class_weight=0.0, radius=0).item() == pytest.approx(0.5, abs=1e-5)  # the neighbours' terms stay 0


def test_a_point_in_a_corner_cell_is_fitted_from_the_cells_on_the_map_each_once():
    net = _pip()
    w = net.config.input_size // net.config.heatmap_stride
    k = net.head.table.shape[-1]
    targets = torch.full((1, 68, 2), 0.25 / (w / 2) - 1)  # every point a quarter cell into the top-left cell
    maps = PipMaps(torch.zeros(1, 68, w, w), torch.zeros(1, 8, w, w))
    net.head.read = lambda features, at: (torch.zeros(1, 68, 2), torch.zeros(1, 68, k, 2))  # offsets all zero
    # on the map within one cell: (0, 0), (1, 0), (0, 1), (1, 1); per axis 0.25 from the own cell's centre, 1.25 from
    # the next: 0.75 for the offsets and as much for the neighbours (at the same place); the 5 cells off the map,
    # clamped back onto the border, would pull it to 0.58 + 0.58
    assert pip_loss(maps, targets, net.head, class_weight=0.0, radius=1).item() == pytest.approx(1.5, abs=1e-6)


def test_a_heatmap_model_gets_the_read_out_with_every_weight_kept(tmp_path):
    torch.manual_seed(0)
    parent = build_model("mnv2", input_size=64, point_sigma=True).eval()
    path = save_model(parent, tmp_path / "parent", {})
    net = initial_model(TrainConfig(init=str(path), head="pip"), shapes=SHAPES).eval()
    assert net.config.head == "pip" and len(net.config.pip_neighbours) == 68 * 10
    state = net.state_dict()
    for key, value in parent.state_dict().items():
        torch.testing.assert_close(state[key], value)
    torch.testing.assert_close(state["head.cells.weight"], state["head.out.weight"])  # the cells start as the heatmaps
    x = torch.rand(2, 1, 64, 64)
    dual = initial_model(TrainConfig(init=str(path), head="dual"), shapes=SHAPES).eval()
    with torch.no_grad():  # the dual head's soft-argmax is the parent's read-out, untouched
        torch.testing.assert_close(HeatmapHead.forward(dual.head, dual.backbone(x), log_sd=True), parent(x, log_sd=True))
    fc = save_model(build_model("tiny"), tmp_path / "fc", {})
    with pytest.raises(ValueError, match="heatmap head"):
        initial_model(TrainConfig(init=str(fc), head="pip"), shapes=SHAPES)


@pytest.mark.parametrize("head", ["pip", "dual"])
def test_round_trip_scores_and_onnx(tmp_path, head):
    from fkp_core.inference import OnnxPredictor
    from fkp_core.weights import load_model

    net = _pip(point_sigma=True, head=head)
    with torch.no_grad():
        for conv in (net.head.offset, net.head.nb):
            conv.weight.normal_(0.0, 0.05)
        net.head.cells.weight *= 100  # clear peaks: a near tie may fall either way in ONNX Runtime's arithmetic
    loaded = load_model(save_model(net, tmp_path / "pip", {}))
    assert loaded.config == net.config
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        want, scored = net(x), net(x, scores=True)
        torch.testing.assert_close(loaded.model(x), want)
    torch.testing.assert_close(scored[..., :2], want)
    assert ((scored[..., 2] >= 0) & (scored[..., 2] <= 1)).all()
    np.testing.assert_allclose(OnnxPredictor(loaded.model, threads=1)(x[:, 0].numpy()), want.numpy(), atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="pip_neighbours"):
        ModelConfig(head="pip")
    with pytest.raises(ValueError, match="pip_neighbours"):
        ModelConfig(head="heatmap", pip_neighbours=TABLE)
    with pytest.raises(ValueError, match="pip_neighbours"):
        ModelConfig(head="dual")
    with pytest.raises(ValueError, match="K >= 1"):
        build_model("mnv2", input_size=64, head="pip", pip_neighbours=(1, 2, 3))
