import numpy as np
import pytest
import torch

from conftest import PROJECT_ROOT
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


def test_onnx_runtime_runs_many_crops_in_bounded_calls():
    """However many crops come (an evaluation's whole training set), ONNX Runtime sees at most ONNX_MAX_BATCH at once,
    and the outputs are those of one crop at a time."""
    from fkp_core.constants import ONNX_MAX_BATCH

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    s = model.config.input_size
    crops = np.random.default_rng(2).integers(0, 256, (2 * ONNX_MAX_BATCH + 5, s, s), dtype=np.uint8)
    predict = OnnxPredictor(model, threads=1)
    run, calls = predict.session.run, []

    def spy(names, feeds):
        calls.append(len(feeds["crops"]))
        return run(names, feeds)

    predict.session = type("Spy", (), {"run": staticmethod(spy)})()
    out = predict(crops)
    assert calls == [ONNX_MAX_BATCH, ONNX_MAX_BATCH, 5]
    one_by_one = np.concatenate([predict(crops[i : i + 1]) for i in range(len(crops))])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)


def test_auto_backend_and_bad_backend():
    model = build_model("tiny").eval()
    assert make_predictor(model, "cpu").backend == "onnx"
    assert make_predictor(model, "cpu", "torch").backend == "torch"
    with pytest.raises(ValueError):
        make_predictor(model, "cpu", "tpu")


def test_a_network_shipped_as_onnx_bytes_runs_as_the_one_loaded_in_place(tmp_path):
    """The annotate job exports the CNN once on its driver and its annotators run the bytes: the same outputs,
    bit for bit, as loading the model in the annotator; and building the session from bytes needs no torch."""
    import pickle
    import subprocess
    import sys

    from fkp_core.onnx_network import export_network, onnx_network
    from fkp_core.segments import load_network
    from fkp_core.weights import resolve_model_path

    model = str(resolve_model_path(None))
    exported = export_network(model)
    here, shipped = load_network(model), onnx_network(pickle.loads(pickle.dumps(exported)))
    assert (shipped.size, shipped.margin) == (here.size, here.margin)
    crops = np.random.default_rng(1).integers(0, 256, (6, here.size, here.size), dtype=np.uint8)
    expected = here.predict(crops)
    assert expected.shape == (6, 68, 3) and np.array_equal(shipped.predict(crops), expected)
    (tmp_path / "net.pkl").write_bytes(pickle.dumps(exported))
    np.save(tmp_path / "crops.npy", crops)
    # ... nor does annotating a segment with it, as a CPU annotator actor does (settings unpickled, YuNet, tracking, pose)
    from fkp_core.segments import AnnotateSettings

    (tmp_path / "settings.pkl").write_bytes(pickle.dumps(AnnotateSettings(model=model)))
    sample = str(PROJECT_ROOT / "examples" / "sample.mp4")
    code = ("import pickle, sys, numpy as np\nfrom fkp_core.onnx_network import onnx_network\n"
            f"net = onnx_network(pickle.loads(open({str(tmp_path / 'net.pkl')!r}, 'rb').read()))\n"
            f"np.save({str(tmp_path / 'out.npy')!r}, net.predict(np.load({str(tmp_path / 'crops.npy')!r})))\n"
            "from fkp_core.records import Segment\nfrom fkp_core.segments import annotate_segment, probe_video\n"
            f"settings = pickle.loads(open({str(tmp_path / 'settings.pkl')!r}, 'rb').read())\n"
            f"info = probe_video({sample!r})\n"
            f"result, rows = annotate_segment(net, {sample!r}, Segment(0, 10), (info.width, info.height), settings)\n"
            "assert result.error is None and len(rows) == 10, (result.error, len(rows))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected)
