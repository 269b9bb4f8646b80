import numpy as np
import pytest
import torch

from fkp_core.inference import OnnxPredictor, TorchPredictor, make_predictor
from fkp_core.model import build_model


@pytest.mark.parametrize("preset", ["tiny", "hm"])
def test_onnx_runtime_matches_torch(preset):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    s = model.config.input_size
    crops = np.random.default_rng(0).integers(0, 256, (5, s, s), dtype=np.uint8)
    a = TorchPredictor(model, torch.device("cpu"))(crops)
    b = OnnxPredictor(model, threads=1)(crops)
    assert a.shape == b.shape == (5, 68, 2)
    assert np.abs(a - b).max() < 1e-4
    assert OnnxPredictor(model)(crops[:0]).shape == (0, 68, 2)
    assert np.allclose(TorchPredictor(model, torch.device("cpu"))(crops.astype(np.float32) / 255), a, atol=1e-5)


def test_auto_backend_and_bad_backend():
    model = build_model("tiny").eval()
    assert make_predictor(model, "cpu").backend == "onnx"
    assert make_predictor(model, "cpu", "torch").backend == "torch"
    with pytest.raises(ValueError):
        make_predictor(model, "cpu", "tpu")
