"""Validation NME of a model's read-outs, and of two models averaged (session 11, docs/experiments.md).

An experiment script, not part of the package. The faces are the identity-disjoint validation split that
jobs.train validates on (course and HELEN, seed 0, 10%) and AFW whole, each cropped from its labels as training
validates. For a pip or dual model (jobs.train --head) it prints each read-out alone: the soft-argmax of its
heatmaps, the peak of its cells with the neighbours' votes, the peak without them, and what the model outputs (one
pass); for a model with a fitted "mirror_offset", also its mirrored pass (the job's default: the crop and its mirror
image averaged); with a second model, the mean of the two models' one passes, and of their mirrored passes.

    python docs/scripts/read_outs.py MODEL [OTHER] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from fkp_core.dataset import parse_source
from fkp_core.metrics import nme
from fkp_core.mirror import averaged
from fkp_core.model import PIP_HEADS, HeatmapHead
from fkp_core.training import TrainConfig, make_datasets, split_records
from fkp_core.weights import load_model


def read_outs(net, mirror_offset: float | None) -> dict:
    """name -> (N, 1, S, S) crops -> (N, 68, 2) points, for each read-out the model has."""
    outs = {"output": lambda x: net(x)}
    if mirror_offset is not None:
        both = averaged(lambda crops: net(torch.from_numpy(crops)[:, None]).numpy(), mirror_offset)
        outs["crop + mirror"] = lambda x: torch.from_numpy(both(x[:, 0].numpy()))
    if net.config.head not in PIP_HEADS:
        return outs
    head = net.head

    def features(x):
        return head.features(net.backbone((x - net._mean) / net._std))

    def without_votes(x):
        f = head.features(net.backbone((x - net._mean) / net._std))
        votes, voters = head._votes, head._voters
        head._votes, head._voters = torch.zeros_like(votes), torch.ones_like(voters)
        try:
            return head.peak_points(f, head.cells(f))
        finally:
            head._votes, head._voters = votes, voters

    outs["peak + votes"] = lambda x: head.peak_points(features(x), head.cells(features(x)))
    outs["peak"] = without_votes
    if net.config.head == "dual":
        outs["soft-argmax"] = lambda x: HeatmapHead.forward(head, net.backbone((x - net._mean) / net._std))
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="one or two model files or bundled names")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = [load_model(m) for m in args.models[:2]]
    nets = [m.model.eval() for m in loaded]
    d = args.data_dir
    train = [parse_source(f"course:{d}/fkp"), parse_source(f"ibug:{d}/300w/helen")]
    fit, held = split_records(train, [parse_source(f"ibug:{d}/300w/afw")], 0.1)
    c = nets[0].config
    _, val = make_datasets(fit, held, TrainConfig(), c.input_size, c.crop_margin, c.upright)
    named = {f"{i}: {name}": fn for i, m in enumerate(loaded) for name, fn in read_outs(m.model, m.fit.mirror_offset).items()}
    preds: dict[str, list] = {k: [] for k in named}
    targets, sources = [], []
    with torch.no_grad():
        for x, t, s in DataLoader(val, batch_size=128):
            for k, fn in named.items():
                preds[k].append(fn(x).numpy())
            targets.append(t.numpy())
            sources.append(s.numpy())
    target, source = np.concatenate(targets), np.concatenate(sources)
    points = {k: np.concatenate(v) for k, v in preds.items()}
    if len(nets) == 2:
        points["mean of the two outputs"] = (points["0: output"] + points["1: output"]) / 2
        if "0: crop + mirror" in points and "1: crop + mirror" in points:
            points["mean of the mirrored passes"] = (points["0: crop + mirror"] + points["1: crop + mirror"]) / 2
    for k, p in points.items():
        err = nme(p, target)
        print(f"{k:28s}", "  ".join(f"{n} {100 * err[source == i].mean():.2f}%" for i, n in enumerate(val.sources)))


if __name__ == "__main__":
    main()
