"""How much of a model's error is a constant offset per point, and whether the training sources' offsets agree.

An experiment script (session 9, docs/experiments.md), not part of the package. Each face is cropped from its
labelled keypoints (upright, jobs.evaluate's gt-box protocol) and predicted with the mirrored pass; the residuals
(prediction - label, in the upright crop's frame, over the inter-ocular distance) are averaged per point into each
set's bias (68 x 2). Printed: each set's NME, the size of its bias, the NME with its own bias taken out (an
oracle), the NME with another set's bias taken out (what a per-source correction learned on training faces would
give), and how the sets' biases correlate.

    python docs/scripts/source_bias.py [--model NAME] [--data-dir ../shared/data]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fkp_core.inference import make_predictor
from fkp_core.mirror import averaged
from fkp_core.weights import load_model
from view_grid import all_sets, script_args, upright_crops  # this folder's other script


def main() -> None:
    args = script_args(__doc__)
    sets = all_sets(Path(args.data_dir))
    loaded = load_model(args.model)
    net = loaded.model.eval()
    size, margin = net.config.input_size, net.config.crop_margin
    predict = averaged(make_predictor(net, "cpu", threads=2), loaded.fit.mirror_offset or 0.0)
    residuals = {}
    for label, records in sets.items():
        crops, truth = upright_crops(records, size, margin)
        pred = (np.asarray(predict(crops))[..., :2] + 1) / 2 * size - 0.5
        iod = np.linalg.norm(truth[:, 36] - truth[:, 45], axis=1)[:, None, None]
        residuals[label] = (pred - truth) / iod
    bias = {k: r.mean(0) for k, r in residuals.items()}

    def nme(r: np.ndarray) -> float:
        return 100 * float(np.linalg.norm(r, axis=2).mean())

    def size_of(b: np.ndarray) -> float:
        return 100 * float(np.linalg.norm(b, axis=1).mean())

    print(f"model {args.model}; NME % (inter-ocular), crops from the labels, mirrored pass")
    print("| set | faces | NME | its bias (mean length) | jaw's bias | NME without its own bias |\n| --- | --- | --- | --- | --- | --- |")
    for k, r in residuals.items():
        print(f"| {k} | {len(r)} | {nme(r):.2f} | {size_of(bias[k]):.2f} | {size_of(bias[k][:17]):.2f} | {nme(r - bias[k]):.2f} |")
    print("\n| set | another set's bias taken out | NME before | after |\n| --- | --- | --- | --- |")
    for target, source in (("course val", "course train"), ("HELEN val", "HELEN train"), ("AFW", "HELEN train"), ("AFW", "course train")):
        r = residuals[target]
        print(f"| {target} | {source} | {nme(r):.2f} | {nme(r - bias[source]):.2f} |")
    print("\n| biases | correlation (136 values) |\n| --- | --- |")
    for a, b in (("HELEN train", "course train"), ("HELEN val", "course val"), ("HELEN train", "HELEN val"), ("HELEN train", "AFW")):
        print(f"| {a} / {b} | {np.corrcoef(bias[a].ravel(), bias[b].ravel())[0, 1]:+.2f} |")


if __name__ == "__main__":
    main()
