"""A training run's checkpoint folder: what it holds, resuming from it, the newest one, the release model from it.

A checkpoint is a folder of three files: ``state.pt`` (model, optimizer and schedule state: resume),
``best.pt`` (the best epoch's weights so far) and ``progress.json`` (the epoch, the best epoch and its
validation NMEs, the training and model configs, the record counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               best_state: dict | None, progress: dict, ema: nn.Module | None = None) -> None:
    """A resumable checkpoint's files: ``state.pt`` (model, optimizer, schedule, the weights' moving average when the
    run keeps one), ``best.pt``, ``progress.json``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, folder / "state.pt")
    torch.save(best_state, folder / "best.pt")
    (folder / "progress.json").write_text(json.dumps(progress))


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               device: torch.device, ema: nn.Module | None = None) -> tuple[dict, dict]:
    """Restore what :func:`save_state` wrote into ``model``, ``optimizer``, ``scheduler`` and ``ema``; (best weights,
    progress)."""
    state = torch.load(folder / "state.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    best_state = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    return best_state, json.loads((folder / "progress.json").read_text())


def export_release(checkpoint_dir: Path, output: Path, name: str, extra: dict[str, Any]) -> Path:
    """Write the best weights of a finished run's checkpoint as a release model."""
    from fkp_core.model import KeypointNet, ModelConfig
    from fkp_core.weights import save_model

    progress = json.loads((checkpoint_dir / "progress.json").read_text())
    model = KeypointNet(ModelConfig.from_dict(progress["model_config"]))
    model.load_state_dict(torch.load(checkpoint_dir / "best.pt", map_location="cpu", weights_only=True))
    meta = {
        "trained": {
            **extra,
            "train_config": progress["train"],
            "epochs_run": progress["epoch"] + 1,
            "best_epoch": progress["best"]["epoch"] + 1,
            "samples": progress["counts"],
        },
        "metrics": {"validation": {k: v for k, v in progress["best"].items() if k != "epoch"}},
        "normalization": {
            "input": "gray in [0, 1], then (x - input_mean) / input_std inside the network",
            "keypoints": "[-1, 1] over the square face crop (crop_margin around the face box)",
            "face_box": "fkp_core.transforms.face_frame (upright: eyes level)" if model.config.upright
            else "fkp_core.transforms.box_from_keypoints (Haar-like framing)",
        },
    }
    return save_model(model, output / name, meta)


def newest_checkpoint(storage: Path, name: str) -> Path | None:
    """The checkpoint folder of a run (local storage) holding the latest epoch, or None."""
    best, epoch = None, -1
    for progress in (storage / name).glob("**/progress.json"):
        try:
            e = json.loads(progress.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            continue  # being written
        if e > epoch and (progress.parent / "best.pt").is_file():
            best, epoch = progress.parent, e
    return best
