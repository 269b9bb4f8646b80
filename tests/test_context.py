"""ModelConfig.context: the pretrained backbone's next stride read into the heatmap decoder; jobs.train --context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import imagenet_weights
from fkp_core.model import ModelConfig, build_model
from fkp_core.training import TrainConfig, initial_model, make_optimizer
from fkp_core.weights import load_model, save_model


def test_the_backbone_runs_to_stride_32_and_its_features_move_the_points():
    torch.manual_seed(0)
    net = build_model("mnv2", input_size=64, context=True).train()  # batch statistics: a fresh network's features are not ~0
    plain = build_model("mnv2", input_size=64).eval()
    assert net.backbone.out_strides[-1] == 32 and plain.backbone.out_strides[-1] == 16
    assert net.head.context.in_channels == 320 and not net.head.context.weight.any()  # starts at zero
    assert len(net.head.lateral) == len(plain.head.lateral)  # the decoder's own levels are the plain model's
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        net.head.out.weight.normal_(0.0, 1.0)  # heatmaps with peaks (a fresh read-out's are flat: every point central)
        before = net(x)
        net.head.context.weight.normal_(0.0, 0.5)
        after = net(x)
        # the deepest features reach the points, and only through the context's 1x1
        assert (after - before).abs().max() > 1e-3
        deep = net.backbone(x)
        deep[-1] = deep[-1] + 1.0
        assert not torch.allclose(net.head(deep), after)


def test_round_trip_and_onnx(tmp_path):
    from fkp_core.inference import OnnxPredictor

    torch.manual_seed(1)
    net = build_model("mnv2", input_size=64, context=True, point_sigma=True).eval()
    with torch.no_grad():
        net.head.context.weight.normal_(0.0, 0.2)
    loaded = load_model(save_model(net, tmp_path / "ctx", {}))
    assert loaded.config == net.config and loaded.config.context
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(loaded.model(x), want)
    np.testing.assert_allclose(OnnxPredictor(loaded.model, threads=1)(x[:, 0].numpy()), want.numpy(), atol=1e-5)


def test_a_trained_model_grows_the_context_with_its_output_unchanged(tmp_path):
    imagenet_weights()
    torch.manual_seed(2)
    parent = build_model("mnv2", input_size=64, point_sigma=True).eval()
    path = save_model(parent, tmp_path / "parent", {})
    net = initial_model(TrainConfig(init=str(path), context=True, freeze_stride=4)).eval()
    assert net.config.context
    state = net.state_dict()
    for key, value in parent.state_dict().items():  # every trained weight kept
        torch.testing.assert_close(state[key], value)
    imagenet = build_model("mnv2", input_size=64, context=True)
    imagenet.load_pretrained()
    new = [k for k in state if k not in parent.state_dict()]
    assert "head.context.weight" in new and any(k.startswith("backbone.features.17.") for k in new)
    for key in new:  # the layers past stride 16 are ImageNet's
        if key.startswith("backbone."):
            torch.testing.assert_close(state[key], imagenet.state_dict()[key])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, log_sd=True), parent(x, log_sd=True))
    groups = make_optimizer(net, TrainConfig(lr=1e-3), steps_per_epoch=1)[0].param_groups
    fast = [g for g in groups if g["lr"] > 1e-3]  # the context's read-out starts at zero, like the error head
    assert any(p is net.head.context.weight for p in fast[0]["params"])


def test_config_errors():
    with pytest.raises(ValueError, match="context needs a pretrained backbone"):
        ModelConfig(head="heatmap", context=True)
    with pytest.raises(ValueError, match="2 x backbone_stride"):
        build_model("mnv2", input_size=64, backbone_stride=32, context=True)
    odd = build_model("mnv2", input_size=112, context=True).eval()  # 112 / 32: a 4 x 4 map read onto the 7 x 7 level
    with torch.no_grad():
        assert odd(torch.rand(1, 1, 112, 112)).shape == (1, 68, 2)
