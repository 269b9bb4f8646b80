"""Measure a model on labelled faces: NME, per-region NME, FR@0.10, AUC, detection rate.

    python -m jobs.evaluate --data course:data/fkp --data ibug:data/300w/afw --out runs/eval

Two protocols per source:
  gt_box      the face crop of a box derived from the ground-truth keypoints (the model alone);
  end_to_end  detection on the full image with jobs.annotate's detector and defaults (the same
              --detector, --min-face, ... flags) -> the detection whose crop box overlaps the
              annotated face's -> crop (through the detector's calibration, upright) -> CNN (what
              users get). Faces the detector misses count in the detection rate and are left out
              of that protocol's NME.
Writes OUT/report.json, OUT/ced.png (cumulative error curves) and OUT/<source>_grid.png (best,
median and worst predictions). Runs in-process: 770 faces take seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from jobs.common import (
    EXIT_OK,
    Parser,
    UsageError,
    add_common_flags,
    add_detector_flags,
    add_view_flags,
    detector_spec,
    load_model_arg,
    non_negative_int,
    positive_float,
    positive_int,
    refuse_validation_sources,
    run_main,
    unit_interval,
)

log = logging.getLogger("fkp.evaluate")
MATCH_IOU = 0.3


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file (NAME.pt + NAME.json), or a bundled model by name ('default', 'hm', 'fast', 'fastest'); default: default")
    p.add_argument("--data", action="append", metavar="[KIND:]PATH",
                   help="labelled source, repeatable: course layout (its --split is used) or an iBUG .pts folder; default: $FKP_DATA/fkp")
    p.add_argument("--split", default="test", choices=["test", "training"], help="which part of a course-layout source")
    add_detector_flags(p.add_argument_group("detection (the end-to-end protocol; the same flags and defaults as jobs.annotate)"))
    p.add_argument("--no-upright", action="store_true", help="crop faces as they lie instead of turning them so the eyes are level")
    p.add_argument("--refine", type=non_negative_int, default=1, help="extra CNN passes re-cropped around the prediction")
    add_view_flags(p)
    p.add_argument("--threshold", type=positive_float, default=0.10, help="NME above which a face counts as a failure (FR) and the CED/AUC limit")
    p.add_argument("--out", default="runs/eval", help="folder for report.json and the PNGs")
    p.add_argument("--device", default="cpu", help="torch device for the CNN")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("face confidence, keypoint scores and the mirrored pass (instead of the accuracy report)")
    g.add_argument("--confidence-report", metavar="DIR", default=None,
                   help="write DIR/report.json (ROC AUC of the face confidence: detections of the annotated face against "
                        "the other detections; keypoint-score calibration: point error by score) and DIR/roc.png")
    g.add_argument("--fit-confidence", action="store_true",
                   help="fit the face confidence's logistic weights on --data (training sources only) and print them")
    g.add_argument("--report-score-threshold", type=unit_interval, default=0.3,
                   help="detector score threshold for these measurements: low, so that detections other than the face exist")
    g.add_argument("--fit-mirror", action="store_true",
                   help="measure the model's horizontal offset for the mirrored refine pass (its JSON's \"mirror_offset\") and how far "
                        "right of what they mark each source's labels sit, on --data (training sources only), and print them")
    g.add_argument("--every", type=positive_int, default=1, help="use every N-th labelled image of each source")
    add_common_flags(p)
    return p


def find_faces(landmarker, image):
    """Crop boxes (N, 4) and angles (N,) of every face the detector finds in one image: what jobs.annotate crops."""
    return landmarker.detector.calibration.crop_regions(landmarker.detector.detect(image), landmarker.upright)


def evaluate_source(landmarker, records, images, threshold: float) -> tuple[dict, dict]:
    """Both protocols on one source: (report, arrays for plots)."""
    import numpy as np

    from fkp_core.detector import iou
    from fkp_core.metrics import ced, summarize
    from fkp_core.transforms import face_frame

    gt = np.stack([r.keypoints for r in records])
    gt_boxes, gt_angles = face_frame(gt, landmarker.upright)
    t0 = time.perf_counter()
    pred_gt = np.concatenate(landmarker.keypoints_in_boxes(images, [b[None] for b in gt_boxes], [a[None] for a in gt_angles]))
    t_gt = time.perf_counter() - t0

    t0 = time.perf_counter()
    found, chosen, angles = [], [], []
    for img, gbox in zip(images, gt_boxes):
        boxes, turns = find_faces(landmarker, img)
        if len(boxes):
            overlap = iou(boxes, gbox[None])[:, 0]
            best = int(np.argmax(overlap))
            if overlap[best] >= MATCH_IOU:
                found.append(True)
                chosen.append(boxes[best : best + 1])
                angles.append(turns[best : best + 1])
                continue
        found.append(False)
        chosen.append(np.zeros((0, 4)))
        angles.append(np.zeros(0))
    kps = landmarker.keypoints_in_boxes(images, chosen, angles)
    t_e2e = time.perf_counter() - t0
    found = np.asarray(found)
    pred_e2e = np.concatenate([k for k in kps if len(k)]) if found.any() else np.zeros((0, 68, 2), np.float32)
    gt_found = gt[found]
    report = {
        "faces": int(len(records)),
        "gt_box": {**summarize(pred_gt, gt, threshold), "seconds": round(t_gt, 2)},
        "end_to_end": {
            **summarize(pred_e2e, gt_found, threshold),
            "detection_rate": float(found.mean()),
            "detected": int(found.sum()),
            "seconds": round(t_e2e, 2),
        },
    }
    from fkp_core.metrics import nme

    arrays = {
        "gt_box_nme": nme(pred_gt, gt),
        "e2e_nme": nme(pred_e2e, gt_found) if len(gt_found) else np.zeros(0),
        "pred_gt": pred_gt,
        "ced_gt": ced(nme(pred_gt, gt), threshold),
        "ced_e2e": ced(nme(pred_e2e, gt_found), threshold) if len(gt_found) else None,
    }
    return report, arrays


def write_grid(path: Path, records, images, pred, errors, per_group: int = 5) -> None:
    import numpy as np

    from fkp_core.viz import sample_grid, write_png

    order = np.argsort(errors)
    mid = len(order) // 2
    picks = list(order[:per_group]) + list(order[max(0, mid - per_group // 2) : mid - per_group // 2 + per_group]) + list(order[-per_group:])
    labels = [("best" if i < per_group else "median" if i < 2 * per_group else "worst") + f" {errors[j]:.3f}" for i, j in enumerate(picks)]
    grid = sample_grid([images[j] for j in picks], [records[j].keypoints for j in picks], [pred[j] for j in picks], labels, columns=per_group)
    write_png(path, grid)


def run(args: argparse.Namespace) -> int:
    import torch

    from fkp_core.dataset import DatasetError, parse_source, read_image
    from fkp_core.detector import make_detector
    from fkp_core.landmarks import Landmarker
    from fkp_core.viz import ced_plot, write_png
    from jobs.train_data import default_data_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.threshold <= 1:
        raise UsageError("--threshold must be in (0, 1]")
    specs = args.data or [str(default_data_dir())]
    try:
        sources = [parse_source(s) for s in specs]
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    if args.fit_mirror or args.fit_confidence:  # fitted on training faces only
        refuse_validation_sources(sources)
        if args.split != "training" and any(src.kind == "course" for src in sources):
            raise UsageError("--fit-mirror and --fit-confidence fit on training faces: add --split training")
    loaded = load_model_arg(args.model, device=args.device)
    spec = detector_spec(args)
    lm = Landmarker(loaded, detector=make_detector(spec), device=args.device, refine=args.refine, upright=not args.no_upright,
                    mirror=not args.no_mirror, shifted_view=args.shifted_view)
    if args.fit_mirror:
        from jobs.mirror_fit import run_fit

        return run_fit(lm, sources, args.split, args.every)
    if args.confidence_report or args.fit_confidence:
        from jobs.confidence_report import run_report

        run_report(lm, sources, spec, args, args.confidence_report)
        return EXIT_OK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(loaded.path), "model_sha256": loaded.metadata.get("sha256"), "detector": asdict(spec),
        "upright": not args.no_upright, "refine": args.refine,
        "mirror_offset": lm.fit.mirror_offset, "shifted_view": lm.shift_pixels, "threshold": args.threshold,
        "command": args.command,
        "sources": {},
    }
    curves = {}
    for src in sources:
        try:
            records = src.read(args.split) if src.kind == "course" else src.read()
        except DatasetError as exc:
            raise UsageError(str(exc)) from None
        images = [read_image(r.image_path) for r in records]
        log.info("%s: %d faces", src.label, len(records))
        rep, arr = evaluate_source(lm, records, images, args.threshold)
        report["sources"][src.label] = rep
        curves[f"{src.label} gt-box"] = arr["ced_gt"]
        if arr["ced_e2e"] is not None:
            curves[f"{src.label} end-to-end"] = arr["ced_e2e"]
        write_grid(out / f"{src.label}_grid.png", records, [read_image(r.image_path, color=True) for r in records], arr["pred_gt"], arr["gt_box_nme"])
        g, e = rep["gt_box"], rep["end_to_end"]
        thr = f"{args.threshold:.2f}"
        print(
            f"{src.label:>10}: {rep['faces']} faces | gt-box NME {g['nme']:.4f} FR@{thr} {g[f'fr@{thr}']:.4f} AUC {g[f'auc@{thr}']:.3f} | "
            f"end-to-end NME {e['nme']:.4f} FR@{thr} {e[f'fr@{thr}']:.4f} AUC {e[f'auc@{thr}']:.3f} detected {e['detection_rate']:.3f}"
        )
    write_png(out / "ced.png", ced_plot(curves, title=f"CED, {Path(str(loaded.path)).stem}"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'report.json'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.evaluate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
