"""Measure (and fit) the face confidence and the keypoint scores on labelled images: ``jobs.evaluate``'s
``--confidence-report DIR`` and ``--fit-confidence``.

Every image goes through the detector at a low score threshold (``--report-score-threshold``), so
that detections that are not the annotated face exist; each detection is cropped, predicted and
scored exactly as ``jobs.annotate`` does on a detection frame (:func:`fkp_core.confidence.face_confidence`),
and is a positive when its crop box overlaps the annotated face's (IoU >= ``MATCH_IOU``), a negative
otherwise. Written to DIR: ``report.json`` (ROC AUC of the confidence and of each of its parts per
source, the ROC points, the keypoint-score calibration), ``roc.png`` and ``<source>_unmatched.png`` (the
unmatched detections with their confidence: data sets annotate one face per image, so other faces in
the picture count as unmatched). The calibration bins every
matched face's points by their score and gives the mean point error over the inter-ocular distance
per bin (and the same per face, by mean score against the face's NME).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fkp_core.confidence import FaceConfidenceWeights

MATCH_IOU = 0.3  # as jobs.evaluate's end-to-end protocol
SCORE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)


def collect(landmarker, records, images, spec, score_threshold: float) -> dict:
    """Per detection on every image: detector score, keypoint scores, consistency, whether it is the annotated face, and
    (matched ones) the per-point error over the inter-ocular distance."""
    from fkp_core.constants import LEFT_EYE_OUTER, RIGHT_EYE_OUTER
    from fkp_core.detector import iou, make_detector
    from fkp_core.tracking import keypoint_consistency
    from fkp_core.transforms import face_frame

    detector = make_detector(replace(spec, score_threshold=score_threshold))
    rows = {"det": [], "kscores": [], "consistency": [], "matched": [], "errors": []}
    tiles = []  # the unmatched detections' boxes, to look at (unannotated faces are among them)
    for rec, img in zip(records, images):
        detections = detector.detect(img)
        boxes, angles = detector.calibration.crop_regions(detections, landmarker.upright)
        if not len(boxes):
            continue
        kps, scores, crops = (x[0] for x in landmarker.predict_passes([img], [boxes], [angles]))
        gt_box = face_frame(rec.keypoints[None], landmarker.upright)[0]
        matched = iou(boxes, gt_box)[:, 0] >= MATCH_IOU
        iod = float(np.linalg.norm(rec.keypoints[RIGHT_EYE_OUTER] - rec.keypoints[LEFT_EYE_OUTER]))
        rows["det"].append(detections.scores)
        rows["kscores"].append(scores)
        rows["consistency"].append(np.array([keypoint_consistency(b, k, upright=landmarker.upright) for b, k in zip(crops, kps)]))
        rows["matched"].append(matched)
        rows["errors"].append(np.linalg.norm(kps - rec.keypoints[None], axis=-1) / iod)
        tiles += [_tile(img, boxes[i]) for i in np.flatnonzero(~matched)]
    if not rows["det"]:
        raise ValueError("no detections at all")
    data = {k: np.concatenate(vs).astype(np.float64) for k, vs in rows.items()}
    data["tiles"] = tiles
    return data


def _tile(image: np.ndarray, box: np.ndarray, side: int = 80) -> np.ndarray:
    """The detection's crop box from the image (black outside it), ``side`` pixels square, gray."""
    import cv2

    from fkp_core.transforms import to_gray

    x, y, w, h = box
    m = np.array([[side / w, 0, -x * side / w], [0, side / h, -y * side / h]])
    return cv2.warpAffine(to_gray(image), m, (side, side), flags=cv2.INTER_AREA, borderValue=0)


def tile_sheet(tiles: list, confidences: np.ndarray, columns: int = 8) -> np.ndarray:
    """The unmatched detections side by side, each labelled with its number and confidence."""
    import cv2

    side = tiles[0].shape[0]
    sheet = np.zeros((-(-len(tiles) // columns) * side, columns * side), np.uint8)
    for i, (t, c) in enumerate(zip(tiles, confidences)):
        r, q = divmod(i, columns)
        cell = t.copy()
        cv2.rectangle(cell, (0, 0), (side - 1, 12), 0, -1)
        cv2.putText(cell, f"#{i} {c:.2f}", (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1, cv2.LINE_AA)
        sheet[r * side : (r + 1) * side, q * side : (q + 1) * side] = cell
    return sheet


def spread_range(landmarker, records, images) -> tuple[float, float]:
    """The heatmap spreads a model's keypoint scores map to 1 and 0: the 5th percentile over the labelled
    faces' points (cropped from their ground-truth box) and the median over non-face crops of the same
    images (the crop moved up onto the forehead and sideways off the face) and blank and noise crops."""
    from fkp_core.transforms import crop_face, face_frame, to_gray

    model, size, margin = landmarker.model, landmarker.size, landmarker.margin
    wide = (1e-3, 10.0)  # score = log(10 / sd) / log(1e4): no clipping for any spread a heatmap can have
    saved, model.head.score_range = model.head.score_range, wide
    rng = np.random.default_rng(0)
    try:
        faces, others = [], []
        for rec, img in zip(records, images):
            gray = to_gray(img)
            box, angle = (x[0] for x in face_frame(rec.keypoints[None], landmarker.upright))
            faces.append(crop_face(gray, box, size, margin, float(angle))[0])
            for shift in ((0.0, -0.8), (0.8, 0.0)):
                moved = box + np.array([shift[0] * box[2], shift[1] * box[3], 0, 0])
                others.append(crop_face(gray, moved, size, margin, 0.0)[0])
        others += [np.full((size, size), v, np.uint8) for v in (0, 128, 255)]
        others += [rng.integers(0, 256, (size, size)).astype(np.uint8) for _ in range(3)]
        from fkp_core.inference import TorchPredictor

        predict = TorchPredictor(model, next(model.parameters()).device, scores=True)
        sd = [np.exp(np.log(wide[1]) - predict(np.stack(c))[..., 2] * np.log(wide[1] / wide[0])) for c in (faces, others)]
    finally:
        model.head.score_range = saved
    return float(np.quantile(sd[0], 0.05)), float(np.median(sd[1]))


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold, and the area under the curve (ties count half)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.r_[0, np.cumsum(y)[distinct]]
    fp = np.r_[0, np.cumsum(~y)[distinct]]
    tpr = tp / max(1, y.sum())
    fpr = fp / max(1, (~y).sum())
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def fit_logistic(features: np.ndarray, labels: np.ndarray, iterations: int = 50, ridge: float = 1e-3) -> np.ndarray:
    """Weights (bias first) of a logistic regression by Newton's method, a little ridge for separable data."""
    x = np.c_[np.ones(len(features)), features]
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        grad = x.T @ (p - labels) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def features(data: dict) -> np.ndarray:
    """The logistic model's inputs: logit of the detector score, mean keypoint score."""
    from fkp_core.confidence import _logit, fit_score

    return np.c_[_logit(data["det"]), fit_score(data["kscores"])]


def calibration_table(data: dict) -> list[dict]:
    """Matched faces' points binned by score: points, mean error / inter-ocular; faces binned by mean score: faces, NME."""
    m = data["matched"].astype(bool)
    k, e = data["kscores"][m], data["errors"][m]
    face_k, face_e = k.mean(axis=1), e.mean(axis=1)
    table = []
    for lo, hi in zip(SCORE_BINS[:-1], SCORE_BINS[1:]):
        pts = (k >= lo) & (k < hi)
        fcs = (face_k >= lo) & (face_k < hi)
        table.append({"bin": f"{lo:.1f}-{min(hi, 1.0):.1f}", "points": int(pts.sum()),
                      "point_error": float(e[pts].mean()) if pts.any() else None,
                      "point_fail@0.10": float((e[pts] > 0.10).mean()) if pts.any() else None,
                      "faces": int(fcs.sum()), "face_nme": float(face_e[fcs].mean()) if fcs.any() else None})
    return table


def summarize(data: dict, weights: FaceConfidenceWeights) -> dict:
    """ROC AUC of the confidence (with the model's ``weights``) and of its parts, the ROC points, the calibration table."""
    from fkp_core.confidence import face_confidence, fit_score

    y = data["matched"].astype(bool)
    conf = face_confidence(data["det"], data["kscores"], data["consistency"], weights)
    out = {"detections": int(len(y)), "matched": int(y.sum()), "unmatched": int((~y).sum())}
    for name, s in (("confidence", conf), ("detector_score", data["det"]), ("mean_keypoint_score", fit_score(data["kscores"])),
                    ("consistency", data["consistency"])):
        out[f"auc_{name}"] = roc(np.asarray(s, np.float64), y)[2] if y.any() and (~y).any() else None
    fpr, tpr, _ = roc(conf.astype(np.float64), y)
    out["roc"] = {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}
    out["calibration"] = calibration_table(data)
    return out


def roc_png(curves: dict, path: Path) -> None:
    """ROC curves (x: false positive rate, y: true positive rate) drawn with OpenCV."""
    import cv2

    from fkp_core.viz import PALETTE, write_png

    w, h, left, top, side = 480, 480, 60, 30, 390
    img = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k in range(6):
        x, y = left + side * k // 5, top + side - side * k // 5
        cv2.line(img, (x, top), (x, top + side), (225, 225, 225), 1)
        cv2.line(img, (left, y), (left + side, y), (225, 225, 225), 1)
        cv2.putText(img, f"{k / 5:.1f}", (x - 10, top + side + 16), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{k / 5:.1f}", (left - 30, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + side, top + side), (0, 0, 0), 1)
    cv2.putText(img, "false positive rate", (left + side // 2 - 70, h - 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "ROC of the face confidence (y: true positive rate)", (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = np.stack([left + np.asarray(fpr) * side, top + side - np.asarray(tpr) * side], axis=1)
        cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], False, color, 2, cv2.LINE_AA, shift=4)
        cv2.putText(img, name, (left + side - 200, top + side - 14 - 18 * i), font, 0.45, color, 1, cv2.LINE_AA)
    write_png(path, img)


def fit_all(landmarker, all_data: list[dict], spread_data: tuple[list, list]) -> dict:
    """Fit the face confidence's weights (with and without a detector score) and measure the keypoint score's
    spread range on training sources; print them as the constants they become."""
    merged = {k: np.concatenate([d[k] for d in all_data]) for k in all_data[0] if k != "tiles"}
    x, y = features(merged), merged["matched"].astype(float)
    w, w1 = fit_logistic(x, y), fit_logistic(x[:, 1:], y)
    sharp, flat = spread_range(landmarker, *spread_data)
    print(f"keypoint score range of this model: KEYPOINT_SPREAD_SHARP = {sharp:.3f}, KEYPOINT_SPREAD_FLAT = {flat:.3f} "
          f"(or \"keypoint_score\": {{\"sharp\": {sharp:.3f}, \"flat\": {flat:.3f}}} in the model's JSON)")
    print(f"fitted face confidence weights: FACE_CONF_BIAS = {w[0]:.3f}, FACE_CONF_DETECTOR = {w[1]:.3f}, FACE_CONF_FIT = {w[2]:.3f}, "
          f"FACE_CONF_FIT_ONLY_BIAS = {w1[0]:.3f}, FACE_CONF_FIT_ONLY = {w1[1]:.3f} ({len(y)} detections, {int(y.sum())} matched)")
    return {"bias": float(w[0]), "detector": float(w[1]), "fit": float(w[2]), "fit_only_bias": float(w1[0]), "fit_only": float(w1[1]),
            "detections": int(len(y)), "matched": int(y.sum()), "keypoint_spread_sharp": sharp, "keypoint_spread_flat": flat}


def write_report(out_dir: str, report: dict, curves: dict, per_source: dict, weights: FaceConfidenceWeights) -> None:
    """report.json, roc.png and each source's sheet of unmatched detections."""
    from fkp_core.confidence import face_confidence
    from fkp_core.viz import write_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    roc_png(curves, out / "roc.png")
    for label, data in per_source.items():
        if data["tiles"]:
            unmatched = ~data["matched"].astype(bool)
            conf = face_confidence(data["det"][unmatched], data["kscores"][unmatched], data["consistency"][unmatched], weights)
            write_png(out / f"{label}_unmatched.png", tile_sheet(data["tiles"], conf))
    print(f"confidence report: {out / 'report.json'}")


def run_report(landmarker, sources: list, spec, args, out_dir: str | None) -> dict:
    """Collect every source; print the fitted weights (``--fit-confidence``) and/or write the report."""
    from fkp_core.dataset import read_image

    per_source, all_data, spread_data = {}, [], ([], [])
    for src in sources:
        records = (src.read(args.split) if src.kind == "course" else src.read())[:: args.every]
        images = [read_image(r.image_path) for r in records]
        spread_data[0].extend(records)
        spread_data[1].extend(images)
        data = collect(landmarker, records, images, spec, args.report_score_threshold)
        all_data.append(data)
        per_source[src.label] = data
    report: dict = {"score_threshold": args.report_score_threshold, "command": args.command, "sources": {}}
    if args.fit_confidence:
        report["fitted"] = fit_all(landmarker, all_data, spread_data)
    curves = {}
    for label, data in per_source.items():
        rep = summarize(data, landmarker.fit.face_weights)
        report["sources"][label] = rep
        curves[f"{label} AUC {rep['auc_confidence']:.3f}" if rep["auc_confidence"] is not None else label] = (rep["roc"]["fpr"], rep["roc"]["tpr"])
        print(f"{label:>10}: {rep['detections']} detections ({rep['matched']} matched) | ROC AUC "
              + " ".join(f"{k[4:]} {v:.4f}" for k, v in rep.items() if k.startswith("auc_") and v is not None))
        for row in rep["calibration"]:
            print(f"{'':>12}score {row['bin']}: {row['points']} points, error {row['point_error']}, {row['faces']} faces, NME {row['face_nme']}")
    if out_dir:
        write_report(out_dir, report, curves, per_source, landmarker.fit.face_weights)
    return report
