"""Test-time views of a model at crop level: which second, third and fourth looks at a face take the most error out.

An experiment script (session 9, docs/experiments.md), not part of the package. Each face of the training sources'
identity-disjoint validation split (course, HELEN: what chooses) and of AFW (validation only: watched, never
chosen on) is cropped from its labelled keypoints as jobs.evaluate's gt-box protocol does (upright), then
predicted on the crop and on its mirror image (with the model's mirror offset), each also with the crop's content
moved (dx, dy) crop pixels; combinations of those looks are averaged and scored by NME (inter-ocular).

    python docs/scripts/view_grid.py [--model NAME] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fkp_core.dataset import read_course, read_ibug, read_image, split_by_identity
from fkp_core.inference import make_predictor
from fkp_core.mirror import mirrored
from fkp_core.transforms import crop_face, face_frame, to_gray
from fkp_core.weights import load_model

SHIFTS = [(0, 0), (4, 4), (-4, -4), (4, -4), (-4, 4), (4, 0), (0, 4), (2, 2)]
COMBOS = {
    "one pass": [("p", 0, 0)],
    "crop + mirror (the job's default)": [("p", 0, 0), ("m", 0, 0)],
    "crop + shifted (4, 4)": [("p", 0, 0), ("p", 4, 4)],
    "crop + mirror of shifted (4, 4)": [("p", 0, 0), ("m", 4, 4)],
    **{f"(crop + mirror) x {{(0, 0), {d}}}": [(t, *s) for t in "pm" for s in ((0, 0), d)] for d in SHIFTS[1:]},
    "(crop + mirror) x {(0, 0), (4, 4), (-4, -4)}": [(t, *s) for t in "pm" for s in ((0, 0), (4, 4), (-4, -4))],
}


def shifted(crops: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Content moved (dx, dy) pixels, the edges repeated: fkp_core.shifted_view.shift_crops for either sign."""
    size = crops.shape[-1]
    pad = ((0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)))
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return np.ascontiguousarray(np.pad(crops, pad, mode="edge")[:, y0 : y0 + size, x0 : x0 + size])


def all_sets(root: Path) -> dict[str, list]:
    """The training sources' identity-disjoint training and validation faces, and AFW."""
    helen_train, helen_val = split_by_identity(read_ibug(root / "300w/helen", verify_images=False, source="helen"))
    course_train, course_val = split_by_identity(read_course(root / "fkp", verify_images=False))
    return {"HELEN train": helen_train, "HELEN val": helen_val, "course train": course_train, "course val": course_val,
            "AFW": read_ibug(root / "300w/afw", verify_images=False, source="afw")}


def upright_crops(records: list, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Each face's crop from its labelled keypoints (jobs.evaluate's gt-box protocol, upright), and the labels in crop pixels."""
    crops, truth = [], []
    for rec in records:
        box, angle = face_frame(rec.keypoints)
        crop, m = crop_face(to_gray(read_image(rec.image_path)), box, size, margin, float(angle))
        crops.append(crop)
        truth.append(rec.keypoints @ m[:2, :2].T + m[:2, 2])
    return np.stack(crops), np.stack(truth)


def script_args(doc: str) -> argparse.Namespace:
    """The two scripts' flags: the model, and where the data is."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="default", help="a bundled model's name or a model file")
    ap.add_argument("--data-dir", default="../shared/data", help="the folder holding fkp/ and 300w/")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="MODEL",
                    help="view_grid: also average the model's crop + mirror with each of these models' (same margin)")
    return ap.parse_args()


def crop_and_mirror(model: str, records: list, size: int) -> np.ndarray:
    """Another model's crop + mirror on its own crops of the faces, in the crop pixels of a ``size``-px crop."""
    loaded = load_model(model)
    net = loaded.model.eval()
    own = net.config.input_size
    crops, _ = upright_crops(records, own, net.config.crop_margin)
    plain = make_predictor(net, "cpu", threads=2)
    both = (np.asarray(plain(crops))[..., :2] + mirrored(plain, loaded.fit.mirror_offset or 0.0)(crops)[..., :2]) / 2
    return ((both + 1) / 2 * own) * size / own - 0.5  # the same box and margin: crops differ in scale only


def main() -> None:
    args = script_args(__doc__)
    sets = {k: v for k, v in all_sets(Path(args.data_dir)).items() if k in ("HELEN val", "course val", "AFW")}
    loaded = load_model(args.model)
    net = loaded.model.eval()
    size, margin = net.config.input_size, net.config.crop_margin
    looks = {"p": make_predictor(net, "cpu", threads=2)}
    looks["m"] = mirrored(looks["p"], loaded.fit.mirror_offset or 0.0)
    errors: dict[str, list[float]] = {name: [] for name in COMBOS}
    for records in sets.values():
        crops, truth = upright_crops(records, size, margin)
        iod = np.linalg.norm(truth[:, 36] - truth[:, 45], axis=1)
        pred = {}
        for dx, dy in SHIFTS:
            view = shifted(crops, dx, dy)
            for tag, fn in looks.items():
                px = (np.asarray(fn(view))[..., :2] + 1) / 2 * size - 0.5
                pred[(tag, dx, dy)] = px - np.array([dx, dy])
        for name, views in COMBOS.items():
            mean = np.mean([pred[v] for v in views], axis=0)
            errors[name].append(100 * float((np.linalg.norm(mean - truth, axis=2).mean(1) / iod).mean()))
        pair = (pred[("p", 0, 0)] + pred[("m", 0, 0)]) / 2
        for other in args.ensemble:
            theirs = crop_and_mirror(other, records, size)
            for name, mean in ((f"{other} alone, crop + mirror", theirs), (f"with {other}, each crop + mirror", (pair + theirs) / 2)):
                errors.setdefault(name, []).append(100 * float((np.linalg.norm(mean - truth, axis=2).mean(1) / iod).mean()))
    print(f"model {args.model}: NME % at crop level ({', '.join(f'{k} {len(v)}' for k, v in sets.items())} faces)")
    print(f"| looks | {' | '.join(sets)} |\n| --- |{' --- |' * len(sets)}")
    for name, row in errors.items():
        print(f"| {name} | {' | '.join(f'{e:.2f}' for e in row)} |")


if __name__ == "__main__":
    main()
