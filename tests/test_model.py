import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import imagenet_weights
from fkp_core.backbones import BACKBONES, PRETRAINED, load_pretrained
from fkp_core.model import MODEL_PRESETS, ModelConfig, build_model, count_parameters
from fkp_core.weights import (
    BUNDLED_MODELS,
    ModelFileError,
    bundled_model_path,
    default_model_path,
    is_bundled,
    load_model,
    read_metadata,
    resolve_model_path,
    save_model,
)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_forward_shape(preset):
    model = build_model(preset).eval()
    s = model.config.input_size
    with torch.no_grad():
        out = model(torch.rand(3, 1, s, s))
    assert out.shape == (3, 68, 2)


def test_config_validation_and_round_trip():
    cfg = ModelConfig(input_size=64, widths=(8, 16), depths=(1, 1), head_hidden=16)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(input_size=100)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"input_size": 64, "wings": 2})
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")


def _tiny(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    path = save_model(model, tmp_path / "m", {"note": "test"})
    return model, path


def test_save_load_round_trip(tmp_path):
    model, path = _tiny(tmp_path)
    assert path.name == "m.pt" and path.with_suffix(".json").is_file()
    loaded = load_model(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x))
    assert loaded.metadata["note"] == "test"
    assert loaded.config == model.config
    assert read_metadata(path)["parameters"] == count_parameters(model)
    assert not loaded.model.training


def test_tampered_bytes_are_refused(tmp_path):
    _, path = _tiny(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused_even_with_a_matching_checksum(tmp_path, capsys):
    _, path = _tiny(tmp_path)
    torch.save({"weight": Payload()}, path)  # an attacker who can also rewrite the JSON
    meta = json.loads(path.with_suffix(".json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="cannot load weights safely"):
        load_model(path)
    assert "pwned" not in capsys.readouterr().out


def test_mismatched_config_is_refused(tmp_path):
    _, path = _tiny(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["head_hidden"] = 32
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not fit the config"):
        load_model(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nothing.pt")
    _, path = _tiny(tmp_path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelFileError, match="metadata file is missing"):
        load_model(path)


def test_truncated_weights_are_refused(tmp_path):
    _, path = _tiny(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["sha256"]  # no checksum to catch it: the loader itself must refuse
    path.with_suffix(".json").write_text(json.dumps(meta))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="cannot load weights safely"):
        load_model(path)


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_models_load_by_name_and_are_small(name):
    path = bundled_model_path(name)
    loaded = load_model(name)
    assert loaded.path == path and path.stat().st_size <= 10 * 1024 * 1024
    assert "jobs.train" in loaded.metadata["trained"]["command"]
    s = loaded.config.input_size
    with torch.no_grad():
        out = loaded.model(torch.rand(1, 1, s, s))
    assert out.shape == (1, 68, 2) and torch.isfinite(out).all()


def test_model_names_paths_and_the_default(tmp_path, monkeypatch):
    assert resolve_model_path(None) == default_model_path() == resolve_model_path("default") == load_model().path
    assert is_bundled(resolve_model_path("fast")) and not is_bundled(tmp_path / "fkp_fast.pt")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("runs/m.pt") == tmp_path / "runs" / "m.pt"  # anything else is a path
    assert resolve_model_path("./fast") == tmp_path / "fast"
    with pytest.raises(ModelFileError, match="no bundled model named 'huge'"):
        bundled_model_path("huge")


def test_the_fast_models_cost_less_than_the_default():
    """What 'fast' means, counted rather than timed: multiply-adds per face (time follows on a CPU)."""
    from torch import nn

    def macs(model: nn.Module) -> int:
        total = 0

        def hook(mod, _inp, out):
            nonlocal total
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        s = model.config.input_size
        with torch.no_grad():
            model(torch.zeros(1, 1, s, s))
        for h in hooks:
            h.remove()
        return total

    default, hm, fast, fastest = (load_model(n) for n in ("default", "hm", "fast", "fastest"))
    assert macs(fastest.model) < 0.5 * macs(fast.model) and macs(fast.model) < 0.6 * macs(hm.model)
    assert macs(fast.model) < 0.7 * macs(default.model)
    for small in (fast, fastest):
        # taught by the default itself (the bundled file at the time, the model this repository ships)
        assert small.metadata["trained"]["distill"]["sha256"] == default.metadata["sha256"]
        assert small.config.upright and small.config.point_sigma  # its view and its kind of keypoint scores
        assert small.metadata["trained"]["init"]["sha256"] != hm.metadata["sha256"]  # from the earlier small model


# ---- ImageNet backbones (fkp_core.backbones) ----


# layers of each backbone beyond the stride-16 cut of the keypoint presets (file keys they leave unused)
_BEYOND_CUT = {
    "mobilenet_v2": lambda k: k.startswith("classifier.") or int(k.split(".")[1]) >= 14,
    "efficientnet_lite0": lambda k: k.startswith(("_fc.", "_conv_head.", "_bn1.")) or int(k.split(".")[1]) >= 11,
}
_PRESET = {"mobilenet_v2": "mnv2", "efficientnet_lite0": "lite0"}


def _imagenet_state(name: str) -> dict:
    return torch.load(imagenet_weights(name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_loads_its_imagenet_state_dict_every_key_and_shape(name):
    state = _imagenet_state(name)
    full = BACKBONES[name](gray=False, num_classes=1000)
    own = full.state_dict()
    assert set(own) == set(state)  # every key of the file has its place, and nothing is left uninitialised
    assert all(own[k].shape == state[k].shape for k in own)
    full.load_state_dict(state, strict=True)
    # the keypoint network's gray backbone, cut at stride 16: every tensor comes from the file
    model = build_model(_PRESET[name], input_size=64)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    unused = model.load_pretrained()
    assert unused and all(_BEYOND_CUT[name](k) for k in unused)
    assert set(model.backbone.state_dict()) | set(unused) == set(state)
    after = model.backbone.state_dict()
    for k, v in after.items():
        if v.is_floating_point() and v.numel() > 1 and not k.endswith("running_var"):
            assert not torch.equal(v, before[k]) or torch.equal(v, state[k]), k
        if k in state and state[k].shape == v.shape:
            torch.testing.assert_close(v, state[k])  # copied as is (the stem is folded: see the next test)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gray_fold_gives_the_rgb_network_on_a_replicated_gray_image(name):
    state = _imagenet_state(name)
    rgb = BACKBONES[name](gray=False, num_classes=1000).eval()
    rgb.load_state_dict(state)
    gray = BACKBONES[name](gray=True, num_classes=1000).eval()
    assert load_pretrained(gray, name) == []
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 1, 70, 70), 7, 1)  # smooth gray images in [0, 1], 64 x 64
    src = PRETRAINED[name]
    mean, std = torch.tensor(src.mean).view(1, 3, 1, 1), torch.tensor(src.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want_maps = rgb((x.expand(-1, 3, -1, -1) - mean) / std)
        got_maps = gray(x)
        want, got = rgb.classify((x.expand(-1, 3, -1, -1) - mean) / std), gray.classify(x)
    for w, g in zip(want_maps, got_maps):  # borders included: the constant channel carries the padding offsets
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert got.softmax(-1).argmax(-1).tolist() == want.softmax(-1).argmax(-1).tolist()


@pytest.mark.parametrize("point_sigma", [False, True])
def test_backbone_model_round_trip_onnx_and_first_conv(tmp_path, point_sigma):
    from fkp_core.inference import OnnxPredictor

    torch.manual_seed(0)
    model = build_model("mnv2", input_size=64, point_sigma=point_sigma).eval()
    assert model.config.upright and model.config.backbone == "mobilenet_v2"
    if point_sigma:  # a fitted error head: scores that differ from point to point and crop to crop
        with torch.no_grad():
            model.head.sigma.weight.normal_(0.0, 0.3)
            model.head.sigma.bias.normal_(-2.0, 0.5)
        model.head.score_range = (0.02, 2.0)
    path = save_model(model, tmp_path / "mnv2", {"note": "backbone", "keypoint_score": {"sharp": 0.02, "flat": 2.0}})
    loaded = load_model(path)
    assert loaded.config == model.config
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(loaded.model(x), want)
        scored = loaded.model(x, scores=True)
    assert want.shape == (2, 68, 2) and want.abs().max() <= 1
    torch.testing.assert_close(scored[..., :2], want)
    if point_sigma:
        assert scored[..., 2].std() > 0.01 and ((scored[..., 2] > 0) & (scored[..., 2] < 1)).all()
    got = OnnxPredictor(loaded.model, threads=1)(x[:, 0].numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    got = OnnxPredictor(loaded.model, threads=1, scores=True)(x[:, 0].numpy())
    np.testing.assert_allclose(got, scored.numpy(), atol=1e-4)
    assert model.first_conv(x).shape[1] == 32  # viz draws the gray stem's filters from a 1-channel crop


def test_old_bundled_models_keep_their_architecture():
    cfg = load_model("hm").config  # trained before the ImageNet backbones: scores from its heatmaps' spread
    assert cfg.backbone == "resnet" and not cfg.upright and not cfg.point_sigma
    for name in ("fast", "fastest"):  # hm's network, narrower, re-distilled from the default with its error head
        cfg = load_model(name).config
        assert cfg.backbone == "resnet" and cfg.upright and cfg.point_sigma
    cfg = load_model("default").config
    assert cfg.backbone == "mobilenet_v2" and cfg.upright and cfg.point_sigma


def test_backbone_config_validation():
    with pytest.raises(ValueError, match="backbone must be"):
        ModelConfig(backbone="vgg", head="heatmap")
    with pytest.raises(ValueError, match="needs a heatmap head"):
        ModelConfig(backbone="mobilenet_v2", head="fc", input_size=64)
    with pytest.raises(ValueError, match="divide input_size"):
        ModelConfig(backbone="mobilenet_v2", head="heatmap", heatmap_stride=8, input_size=72)
    with pytest.raises(ValueError, match="point_sigma needs a heatmap head"):
        ModelConfig(head="fc", point_sigma=True)
    with pytest.raises(ValueError, match="head_expand needs a heatmap head"):
        ModelConfig(head="fc", head_expand=32)


def test_a_wider_read_out_joins_a_trained_model_without_moving_its_points_and_round_trips(tmp_path):
    from fkp_core.inference import OnnxPredictor
    from fkp_core.training import TrainConfig, initial_model

    torch.manual_seed(0)
    base = build_model("mnv2", input_size=64, point_sigma=True).eval()
    with torch.no_grad():  # a trained-looking model: its error head away from its initial constant
        base.head.sigma.weight.normal_(0.0, 0.3)
    parent = save_model(base, tmp_path / "parent", {"note": "parent"})
    grown = initial_model(TrainConfig(init=str(parent), head_expand=16, point_sigma=True)).eval()
    assert grown.config.head_expand == 16 and grown.head.expand is not None
    assert count_parameters(grown) > count_parameters(base)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, scores=True), base(x, scores=True))  # zero-initialised: the parent's output
        # as training moves it: its batch norm fitted to the (untrained, tiny) features, its output weights off zero
        grown.head.expand[1].running_var.fill_(1e-8)
        grown.head.expand[-1].weight.normal_(0.0, 1.0)
        moved = grown(x)
    assert (moved - base(x)).abs().max() > 1e-3
    path = save_model(grown, tmp_path / "grown", {"note": "grown"})
    loaded = load_model(path)
    assert loaded.config.head_expand == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), moved)
    np.testing.assert_allclose(OnnxPredictor(loaded.model, threads=1)(x[:, 0].numpy()), moved.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="already has a heatmap read-out of width 16"):
        initial_model(TrainConfig(init=str(path), head_expand=32))


def test_a_model_with_a_backbone_fine_tunes_at_another_input_size_with_every_weight_kept(tmp_path):
    from fkp_core.training import TrainConfig, initial_model

    torch.manual_seed(0)
    base = build_model("mnv2", input_size=64, point_sigma=True).eval()
    parent = save_model(base, tmp_path / "parent", {"note": "parent"})
    resized = initial_model(TrainConfig(init=str(parent), input_size=96)).eval()
    assert resized.config == replace(base.config, input_size=96)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(resized.state_dict()[name], value)
    assert resized.head._grid.numel() == 96 // 8
    with torch.no_grad():
        out = resized(torch.rand(2, 1, 96, 96), scores=True)
    assert out.shape == (2, 68, 3) and torch.isfinite(out).all() and out[..., :2].abs().max() <= 1
    assert initial_model(TrainConfig(init=str(parent), input_size=64)).config == base.config
    plain = save_model(build_model("tiny"), tmp_path / "plain", {"note": "dense head"})
    with pytest.raises(ValueError, match="only a model with a pretrained backbone"):
        initial_model(TrainConfig(init=str(plain), input_size=96))


def test_freezing_keeps_early_layers_and_their_batch_norms():
    torch.manual_seed(0)
    model = build_model("mnv2", input_size=64)
    frozen = model.backbone.freeze(8)
    assert frozen > 0
    early = model.backbone.early_modules(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert all(not m.training for m in early) and model.head.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.rand(4, 1, 64, 64)).square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    early_keys = {k for k in after if k.startswith("backbone.features.") and int(k.split(".")[2]) < len(early)}
    assert early_keys and all(torch.equal(after[k], before[k]) for k in early_keys)  # running stats too
    assert any(not torch.equal(after[k], before[k]) for k in after if k not in early_keys)
