"""fkp_core.pruning: a MobileNetV2 network narrowed to its heaviest hidden channels; jobs.train --prune."""

from __future__ import annotations

import pytest
import torch

from fkp_core.model import ModelConfig, build_model
from fkp_core.pruning import channel_importance, hidden_widths, prune, pruned_widths
from fkp_core.weights import load_model, save_model

STOCK = [32, 96, 144, 144, 192, 192, 192, 384, 384, 384, 384, 576, 576]  # torchvision's, blocks up to stride 16


def _trained_looking(seed: int = 0):
    """An mnv2 network with random batch-norm statistics, so that every channel matters and differs."""
    torch.manual_seed(seed)
    net = build_model("mnv2", input_size=64, point_sigma=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_widths_halve_up_to_the_stride_in_blocks_of_eight():
    net = _trained_looking()
    assert hidden_widths(net.backbone) == STOCK
    assert pruned_widths(net.backbone, 0.5, 8) == [16, 48, 72, 72, 96, 96] + STOCK[6:]
    assert pruned_widths(net.backbone, 0.5, 4) == [16, 48, 72] + STOCK[3:]
    assert pruned_widths(net.backbone, 1.0, 8) == STOCK
    with pytest.raises(ValueError, match="keep"):
        pruned_widths(net.backbone, 0.0, 8)


def test_keeping_everything_changes_nothing():
    net = _trained_looking()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(prune(net, 1.0)(x, scores=True), net(x, scores=True), atol=0, rtol=0)


def test_the_channels_dropped_are_those_that_pass_nothing_on():
    """Silence half of each early block's hidden channels (depthwise batch norm to zero: the channel's output is 0
    whatever comes in); pruning must drop exactly those, so the narrow network computes what the wide one does."""
    net = _trained_looking()
    features = list(net.backbone.features)
    widths = pruned_widths(net.backbone, 0.5, 8)
    generator = torch.Generator().manual_seed(1)
    for block, width in zip(features[1:], widths):
        hidden = block.conv[-2].in_channels
        if width == hidden:
            continue
        dead = torch.randperm(hidden, generator=generator)[: hidden - width]
        bn = block.conv[-3][1]
        bn.weight.data[dead] = 0.0
        bn.bias.data[dead] = 0.0
        assert (channel_importance(block)[dead] == 0).all()
    narrow = prune(net, 0.5).eval()
    assert narrow.config.backbone_hidden == tuple(widths)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in net.parameters())
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x, scores=True), net(x, scores=True), atol=1e-4, rtol=0)
        for got, want in zip(narrow.backbone(x), net.backbone(x)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # where every channel passes something on, the narrow network's features differ: the check above can fail
        other = _trained_looking(seed=5)
        assert (prune(other, 0.5).eval().backbone(x)[0] - other.backbone(x)[0]).abs().max() > 0.1


def test_a_pruned_model_saves_and_loads(tmp_path):
    narrow = prune(_trained_looking(), 0.5).eval()
    path = save_model(narrow, tmp_path / "narrow")
    loaded = load_model(path)
    assert loaded.config.backbone_hidden == narrow.config.backbone_hidden
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), narrow(x), atol=0, rtol=0)


def test_only_mobilenet_v2_has_hidden_widths():
    with pytest.raises(ValueError, match="backbone_hidden needs backbone='mobilenet_v2'"):
        ModelConfig.from_dict({**build_model("lite0").config.to_dict(), "backbone_hidden": [16]})
    with pytest.raises(ValueError, match="hidden gives 2 widths for 13 blocks"):
        build_model("mnv2", backbone_hidden=(16, 48))
    with pytest.raises(ValueError, match="only a mobilenet_v2 backbone"):
        prune(build_model("hm"), 0.5)
