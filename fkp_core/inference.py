"""The CNN at inference time: ONNX Runtime on CPU, torch on GPU (or where ONNX is unavailable).

PyTorch's eager CPU convolutions fall back to a slow im2col path for small batches, where ONNX
Runtime runs the same graph several times faster with equal outputs (``python -m jobs.bench model
--backend torch`` against ``--backend onnx``). Batch 1 is
what the video fast path runs (one face, one frame at a time), so the CPU path exports the
network to ONNX in memory once per process and runs it there. The annotate job exports once
on its driver and ships the bytes to its annotators instead (:mod:`fkp_core.onnx_network`).
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Protocol

import numpy as np
import torch

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.model import KeypointNet
from fkp_core.onnx_network import OnnxSession
from fkp_core.onnx_network import as_float as _as_float

log = logging.getLogger(__name__)
ONNX_OPSET = 17


class CropPredictor(Protocol):
    """(N, S, S) gray crops (uint8, or float in [0, 1]) -> (N, 68, 2) keypoints in [-1, 1] crop units,
    or (N, 68, 3) with each point's score (0..1) as the third value when made with ``scores=True``."""

    backend: str

    def __call__(self, crops: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """The network in eager torch on any device, in chunks of ``batch_size``."""

    backend = "torch"

    def __init__(self, model: KeypointNet, device: torch.device, batch_size: int = 256, scores: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.scores = scores

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, NUM_KEYPOINTS, 3 if self.scores else 2), np.float32)
        arr = _as_float(crops)
        out = []
        for start in range(0, len(arr), self.batch_size):
            x = torch.from_numpy(arr[start : start + self.batch_size]).unsqueeze(1).to(self.device, non_blocking=True)
            out.append(self.model(x, scores=True).float().cpu().numpy() if self.scores else self.model(x).float().cpu().numpy())
        return np.concatenate(out)


def onnx_bytes(model: KeypointNet, scores: bool = False) -> bytes:
    """The network exported to ONNX in memory (with each point's score as a third output value with ``scores``)."""
    size = model.config.input_size
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter is the one that needs no extra packages; torch marks it legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(
            (_WithScores(model) if scores else model).cpu().eval(), (torch.zeros(1, 1, size, size),), buf, input_names=["crops"], output_names=["keypoints"],
            dynamic_axes={"crops": {0: "n"}, "keypoints": {0: "n"}}, opset_version=ONNX_OPSET, dynamo=False,
        )
    return buf.getvalue()


class OnnxPredictor(OnnxSession):
    """The network exported to ONNX (in memory) and run by ONNX Runtime on the CPU."""

    def __init__(self, model: KeypointNet, threads: int | None = None, scores: bool = False):
        super().__init__(onnx_bytes(model, scores), threads or torch.get_num_threads(), scores)


class _WithScores(torch.nn.Module):
    """The network's forward with per-point scores, as a module of its own for the ONNX export."""

    def __init__(self, model: KeypointNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, scores=True)


def make_predictor(model: KeypointNet, device: torch.device | str = "cpu", backend: str = "auto", threads: int | None = None,
                   scores: bool = False) -> CropPredictor:
    """The fastest available way to run ``model`` on ``device``.

    ``auto``: ONNX Runtime on CPU when it is installed and the export works, else torch. ``scores``:
    each point's score as a third value (models with a heatmap head; ignored for others).
    """
    scores = scores and model.has_scores
    device = torch.device(device)
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
    if backend != "torch" and device.type == "cpu":
        try:
            return OnnxPredictor(model, threads, scores)
        except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
            if backend == "onnx":
                raise
            log.warning("ONNX Runtime unavailable (%s: %s); running the CNN in torch", type(exc).__name__, exc)
    return TorchPredictor(model, device, scores=scores)
