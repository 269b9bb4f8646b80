import json

import pytest
import torch

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

    default, fast, fastest = load_model("default"), load_model("fast"), load_model("fastest")
    assert macs(fastest.model) < 0.5 * macs(fast.model) and macs(fast.model) < 0.6 * macs(default.model)
    for small in (fast, fastest):
        assert small.metadata["trained"]["distill"]["sha256"] == default.metadata["sha256"]  # taught by the default
