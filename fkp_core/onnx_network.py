"""The CNN as ONNX bytes: exported once where torch is (a job's driver), run anywhere ONNX Runtime is.

Exporting the network to ONNX means importing torch and tracing the model, the larger part of an
annotator's start-up; building an ONNX Runtime session from the exported bytes needs neither. So a
run exports once (:func:`export_network`, on the driver, which has loaded the model anyway) and ships
the bytes to every CPU annotator, which only builds a session (:func:`onnx_network`). This module
imports no torch: :class:`OnnxSession` is also what :class:`fkp_core.inference.OnnxPredictor` runs,
so the graph and session settings are the same whichever process exported it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS, ONNX_MAX_BATCH
from fkp_core.fitted import ModelFit

if TYPE_CHECKING:
    from fkp_core.segments import Network


def as_float(crops: np.ndarray) -> np.ndarray:
    """Crops as the network takes them: float32 in [0, 1] (uint8 crops are scaled)."""
    arr = np.asarray(crops)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


class OnnxSession:
    """The exported network run by ONNX Runtime on the CPU: (N, S, S) crops -> (N, 68, 2), or (N, 68, 3) with scores."""

    backend = "onnx"

    def __init__(self, onnx: bytes, threads: int = 1, scores: bool = False):
        import onnxruntime as ort

        self.scores = scores
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """Calls of at most :data:`~fkp_core.constants.ONNX_MAX_BATCH` crops: memory stays bounded however many come."""
        if len(crops) == 0:
            return np.zeros((0, NUM_KEYPOINTS, 3 if self.scores else 2), np.float32)
        arr = as_float(crops)[:, None]
        return np.concatenate([self.session.run(None, {"crops": arr[i : i + ONNX_MAX_BATCH]})[0]
                               for i in range(0, len(arr), ONNX_MAX_BATCH)])


@dataclass(frozen=True)
class ExportedNetwork:
    """What a CPU annotator needs to run the CNN: the ONNX graph and the crop geometry it was trained on."""

    onnx: bytes
    size: int
    margin: float
    scores: bool  # the graph's output carries each point's score
    fit: ModelFit = ModelFit()  # fitted with this model (its JSON)


def export_network(model: str) -> ExportedNetwork | None:
    """The model file's network exported to ONNX as :func:`fkp_core.segments.load_network` runs it (point scores
    where the model has them). None where ONNX Runtime or the export is unavailable: annotators then load the
    model themselves and run it as they can."""
    import logging

    from fkp_core.inference import onnx_bytes
    from fkp_core.weights import load_model

    loaded = load_model(model)
    net = loaded.model.eval()
    try:
        import onnxruntime  # noqa: F401 - the bytes are of no use without it

        data = onnx_bytes(net, scores=net.has_scores)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs start-up time
        logging.getLogger(__name__).warning("ONNX export unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    return ExportedNetwork(data, net.config.input_size, net.config.crop_margin, net.has_scores, loaded.fit)


def onnx_network(exported: ExportedNetwork) -> Network:
    """A segment's network from exported bytes, on one CPU thread (parallelism comes from running many segments)."""
    from fkp_core.segments import Network

    session = OnnxSession(exported.onnx, threads=1, scores=exported.scores)
    return Network(session, exported.size, exported.margin, exported.fit)
