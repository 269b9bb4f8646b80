"""Benchmarks that print and save their figures (JSON): throughput, CNN speed, smoothing.

    python -m jobs.bench annotate VIDEO... [--detect-every 1,10]   decode-only fps vs the job's fps, per stage
    python -m jobs.bench model [--device cuda] [--threads 1]       CNN ms per face by batch size
    python -m jobs.bench smoothing [--truth-clip examples/sample.mp4]  jitter on a still face, NME on moving faces
    python -m jobs.bench finalize [--minutes 30,60,120 --faces 5]  peak memory of finishing a video, by length

Machines are shared and noisy: quote ratios measured in one run (job fps / decode-only fps on
the same file), not absolute numbers from different runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from jobs import bench_memory
from jobs.common import (
    EXIT_OK,
    HelpFormatter,
    Parser,
    UsageError,
    add_common_flags,
    non_negative_float,
    positive_float,
    positive_int,
    refuse_validation_sources,
    run_main,
)

log = logging.getLogger("fkp.bench")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True, metavar="{annotate,model,smoothing,detector,finalize}")
    a = sub.add_parser("annotate", help="decode-only fps and end-to-end job fps on the same videos, with per-stage times",
                       formatter_class=HelpFormatter)
    a.add_argument("videos", nargs="+", help="video files (the reference clip: talk_640x480_3000.mp4)")
    a.add_argument("--detect-every", default="1,10", help="comma-separated K values to measure (1 = the detector on every frame)")
    a.add_argument("--detector", default="yunet", help="comma-separated jobs.annotate --detector values to measure in the same run (yunet, fast, recall)")
    a.add_argument("--sample-fps", default="all", help="comma-separated jobs.annotate --sample-fps values to measure in the same run ('all': every frame)")
    a.add_argument("--segment-frames", type=positive_int, default=None, help="passed to the job (default: the job's)")
    a.add_argument("--gop", type=positive_int, default=None, metavar="N",
                   help="first re-encode each video (H.264) with a keyframe every N frames, and measure that copy: "
                        "--sample-fps seeks over keyframe intervals shorter than its step (default: the videos as they are)")
    a.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local Ray instance (default: all)")
    a.add_argument("--extra", default="", help="more flags for jobs.annotate, as one string (e.g. '--model-actors 1')")
    a.add_argument("--variant", action="append", default=None, metavar="FLAGS",
                   help="repeatable: jobs.annotate flags (one string, '' for none) to compare in the same run, each on top of --extra, "
                        "e.g. --variant= --variant=--no-mirror (default: one run without)")
    m = sub.add_parser("model", help="CNN time per face by batch size", formatter_class=HelpFormatter)
    m.add_argument("--model", default=None, help="model file, or a bundled model by name ('default', 'hm', 'fast', 'fastest'); default: default")
    m.add_argument("--device", default="cpu", help="torch device")
    m.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1 = one core, as the 3 ms budget is stated)")
    m.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated batch sizes")
    m.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"], help="auto: ONNX Runtime on CPU, torch on GPU")
    m.add_argument("--seconds", type=positive_float, default=3.0, help="time per batch size")
    s = sub.add_parser("smoothing", help="jitter on a still face and NME on moving faces, with and without smoothing",
                       formatter_class=HelpFormatter)
    s.add_argument("--truth-clip", default=str(EXAMPLES / "sample.mp4"), help="clip with a ground-truth CSV beside it (NAME_truth.csv)")
    s.add_argument("--still-frames", type=positive_int, default=150, help="frames of the generated still-face clip")
    s.add_argument("--noise", type=non_negative_float, default=4.0, help="sensor noise sigma (gray levels) added to each still frame")
    s.add_argument("--detect-every", default="1,10,30", help="comma-separated K values for the moving-face NME (the first is the reference)")
    s.add_argument("--extra", default="", help="more flags for jobs.annotate, as one string (e.g. '--model fast')")
    f = bench_memory.add_parser(sub, HelpFormatter)
    d = sub.add_parser("detector", help="YuNet faces per clip and labelled faces found, by score threshold (how the default was chosen)",
                       formatter_class=HelpFormatter)
    d.add_argument("videos", nargs="+", help="development clips (a no-face control, single-person clips, a crowd)")
    d.add_argument("--data", action="append", metavar="[KIND:]PATH", default=None,
                   help="labelled training faces, repeatable (course layout: its training split; iBUG folder); never AFW")
    d.add_argument("--every", type=positive_int, default=2, help="use every Nth labelled face")
    d.add_argument("--yunet-model", action="append", default=None, help="YuNet ONNX file, repeatable (default: the bundled one)")
    d.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9", help="comma-separated score thresholds")
    for sp in (a, m, s, d, f):
        sp.add_argument("--json", default=None, help="where to save the figures (default: runs/bench/<what>-<time>.json)")
        add_common_flags(sp)
    add_common_flags(p)
    return p


def _machine() -> dict:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _save(args: argparse.Namespace, result: dict) -> Path:
    path = Path(args.json) if args.json else Path("runs/bench") / f"{args.what}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    return path


def decode_only_fps(path: str) -> tuple[int, float]:
    """Frames and seconds to decode the whole file to gray in one process (FFmpeg threads on all cores)."""
    from fkp_core.video import read_frames

    t0 = time.perf_counter()
    n = sum(1 for _ in read_frames(path, 0, None, gray=True))
    return n, time.perf_counter() - t0


def sampled_decode(path: str, rate: float) -> dict:
    """The reading ``--sample-fps rate`` does, alone in one process (FFmpeg threads on all cores): seconds,
    frames sampled, frames the decoder output (fewer than the file's where it seeks over keyframe intervals)."""
    from fkp_core.sampling import sample_frames, skip_until
    from fkp_core.video import DecodeStats, read_frames

    st = DecodeStats()
    t0 = time.perf_counter()
    n = sum(1 for _ in sample_frames(read_frames(path, 0, None, gray=True, stats=st, skip_until=skip_until(rate)), rate))
    return {"seconds": time.perf_counter() - t0, "sampled": n, "decoder_frames": st.decoder_frames, "seeks": st.seeks}


def _annotate_grid(args: argparse.Namespace) -> list[tuple[str, str, int, float | None]]:
    """The (variant, detector, detect-every, sample-fps) runs the flags ask for, checked."""
    ks = [int(k) for k in args.detect_every.split(",") if k.strip()]
    detectors, rates = _detectors_flag(args.detector), _sample_fps_flag(args.sample_fps)
    for v in args.videos:
        if not Path(v).is_file():
            raise UsageError(f"{v}: no such file")
    variants = args.variant if args.variant else [""]
    from jobs.annotate import build_parser as annotate_parser

    for v in variants:  # each a valid jobs.annotate command line, checked before any measuring
        _, unknown = annotate_parser().parse_known_args([args.videos[0], "--out", "x", *args.extra.split(), *v.split()])
        if unknown:
            raise UsageError(f"--variant {v!r}: not jobs.annotate flags: {' '.join(unknown)}")
    return [(v, d, k, r) for v in variants for d in detectors for k in ks for r in rates]


def _detectors_flag(text: str) -> list[str]:
    from fkp_core.detector import DETECTORS

    detectors = [d.strip() for d in text.split(",") if d.strip()]
    if not detectors or set(detectors) - set(DETECTORS):
        raise UsageError(f"--detector: comma-separated names from {', '.join(DETECTORS)}")
    return detectors


def _sample_fps_flag(text: str) -> list[float | None]:
    try:
        rates = [None if r.strip() == "all" else float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError("--sample-fps: comma-separated numbers > 0 or 'all'") from None
    if not rates or any(r is not None and not r > 0 for r in rates):
        raise UsageError("--sample-fps: comma-separated numbers > 0 or 'all'")
    return rates


def _annotate_run(args: argparse.Namespace, path: str, variant: str, detector: str, k: int, rate: float | None, frames: int,
                  secs: float) -> dict:
    """One jobs.annotate run on ``path``: its speed against the decode-only figure measured right before, per-stage CPU."""
    from fkp_core.store import open_output
    from fkp_core.video import video_id
    from jobs import annotate

    with tempfile.TemporaryDirectory() as tmp:
        argv = [path, "--out", f"{tmp}/out", "--detect-every", str(k), "--detector", detector, "-q", *args.extra.split(), *variant.split()]
        argv += ["--sample-fps", str(rate)] if rate else []
        if args.segment_frames:
            argv += ["--segment-frames", str(args.segment_frames)]
        t0 = time.perf_counter()
        code = annotate.main(argv)
        wall = time.perf_counter() - t0
        status = open_output(f"{tmp}/out").read_json(open_output(f"{tmp}/out").status_path(video_id(path)))
    return {
        "variant": variant, "detector": detector, "detect_every": k, "sample_fps": rate, "exit_code": code, "wall_s": wall, "fps": frames / wall, "decode_only_fps": frames / secs,
        "ratio_to_decode_only": (frames / wall) / (frames / secs), "faces": status.get("faces"),
        "stage_cpu_seconds": status.get("stage_seconds"),
        "stage_ms_per_frame": {s: 1000 * v / max(frames, 1) for s, v in (status.get("stage_seconds") or {}).items()},
    }


def _print_annotate_run(path: str, run: dict) -> None:
    rate, sampled = run["sample_fps"], run.get("sampled_decode")
    print(f"{Path(path).name}: decode-only {run['decode_only_fps']:.0f} fps | {run['detector']}, detect-every {run['detect_every']}"
          f"{', ' + run['variant'] if run.get('variant') else ''}"
          f"{f', sample-fps {rate:g}' if rate else ''}: "
          f"{run['fps']:.0f} fps = {run['ratio_to_decode_only']:.2f} x decode-only | per frame (CPU ms): "
          + ", ".join(f"{s} {v:.2f}" for s, v in run["stage_ms_per_frame"].items()))
    if sampled:
        print(f"  sampled decode alone: {sampled['sampled']} frames sampled, {sampled['decoder_frames']} decoded "
              f"({sampled['seeks']} seeks), {sampled['x_decode_only_time']:.2f} x the decode-only time")


def bench_annotate(args: argparse.Namespace) -> dict:
    from jobs import annotate
    from jobs.common import init_ray

    grid = _annotate_grid(args)
    init_ray(num_cpus=args.num_cpus)  # start-up is not part of the figure
    with tempfile.TemporaryDirectory() as tmp:  # warm the worker processes (imports, model load, ONNX export)
        annotate.main([str(EXAMPLES / "sample.mp4"), "--out", f"{tmp}/warm", "-q", *args.extra.split()])
    results = []
    with tempfile.TemporaryDirectory() as copies:
        for path in args.videos:
            entry = _bench_video(args, grid, _with_gop(path, args.gop, copies) if args.gop else path)
            results.append({"source": path, **entry})
    return {"what": "annotate", "machine": _machine(), "command": args.command, "results": results}


def _with_gop(path: str, gop: int, folder: str) -> str:
    """An H.264 copy of ``path`` in ``folder`` with a keyframe every ``gop`` frames (same frames, rate and size)."""
    import av

    from fkp_core.video import probe, read_frames

    info = probe(path)
    dest = str(Path(folder) / f"{Path(path).stem}-gop{gop}.mp4")
    with av.open(dest, "w") as out:
        stream = out.add_stream("libx264", rate=info.rate, options={"crf": "18", "preset": "veryfast", "g": str(gop),
                                                                   "keyint_min": str(gop), "sc_threshold": "0"})
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, "yuv420p"
        stream.codec_context.gop_size = gop
        for i, f in enumerate(read_frames(path, 0, None)):
            frame = av.VideoFrame.from_ndarray(f.image, format="bgr24")
            frame.pts, frame.time_base = i, 1 / info.rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return dest


def _bench_video(args: argparse.Namespace, grid: list, path: str) -> dict:
    """Every run of the grid on one video, each after a decode-only measurement of its own."""
    from fkp_core.video import probe

    info = probe(path)
    entry = {"video": path, "gop": args.gop, "size": [info.width, info.height], "runs": []}
    for variant, detector, k, rate in grid:
        # decode-only right before each run: on a shared machine the speed of the cores drifts
        # between minutes, and a ratio is only as good as its two figures are close in time
        frames, secs = decode_only_fps(path)
        entry["frames"] = frames
        sampled = sampled_decode(path, rate) if rate else None
        run = _annotate_run(args, path, variant, detector, k, rate, frames, secs)
        if sampled:
            run["sampled_decode"] = {**sampled, "x_decode_only_time": sampled["seconds"] / secs}
        entry["runs"].append(run)
        _print_annotate_run(path, run)
    entry["decode_only_fps"] = sorted(r["decode_only_fps"] for r in entry["runs"])[len(entry["runs"]) // 2]  # median
    return entry


def bench_model(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from fkp_core.inference import make_predictor
    from fkp_core.weights import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    predict = make_predictor(loaded.model, args.device, args.backend, threads=args.threads)
    size = loaded.config.input_size
    rng = np.random.default_rng(0)
    rows = []
    print(f"backend: {predict.backend}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        crops = rng.integers(0, 256, (bs, size, size), dtype=np.uint8)
        for _ in range(3):
            predict(crops)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            predict(crops)  # includes host->device copies and the result's return to numpy
            n += bs
        dt = time.perf_counter() - t0
        rows.append({"batch": bs, "ms_per_face": 1000 * dt / n, "faces_per_s": n / dt})
        print(f"batch {bs:5d}: {1000 * dt / n:.3f} ms/face, {n / dt:,.0f} faces/s ({args.device}, {args.threads} thread(s))")
    return {"what": "model", "machine": _machine(), "model": str(loaded.path), "device": args.device, "threads": args.threads,
            "backend": predict.backend,
            "command": args.command, "results": rows}


def bench_smoothing(args: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd

    from fkp_core.metrics import interocular, nme
    from fkp_core.video import VideoWriter, read_frames
    from jobs import annotate
    from jobs.common import init_ray

    clip = Path(args.truth_clip)
    truth_csv = clip.with_name(clip.stem + "_truth.csv")
    if not clip.is_file() or not truth_csv.is_file():
        raise UsageError(f"{clip}: needs the clip and {truth_csv.name} beside it")
    init_ray()
    truth = pd.read_csv(truth_csv).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)
    out: dict = {"what": "smoothing", "machine": _machine(), "command": args.command}
    with tempfile.TemporaryDirectory() as tmp:
        # a still face: the clip's first frame repeated, with fresh sensor noise in every frame
        first = next(iter(read_frames(clip, 0, 1))).image
        rng = np.random.default_rng(0)
        still = Path(tmp) / "still.mp4"
        with VideoWriter(still, 30, first.shape[1], first.shape[0], crf=12) as w:
            for _ in range(args.still_frames):
                w.write(np.clip(first.astype(np.float32) + rng.normal(0, args.noise, first.shape), 0, 255).astype(np.uint8))
        assert annotate.main([str(still), "--out", f"{tmp}/still", "-q", *args.extra.split()]) == 0
        df = pd.read_parquet(f"{tmp}/still")
        jitter = {}
        for col in ("keypoints_raw", "keypoints"):
            kp = np.stack(df[col].to_numpy()).reshape(-1, 68, 2)
            step = np.linalg.norm(np.diff(kp, axis=0), axis=-1).mean(axis=-1)
            jitter[col] = float((step / interocular(kp[1:])).mean())
        out["still"] = {"frames": args.still_frames, "noise_sigma": args.noise, "jitter_raw": jitter["keypoints_raw"],
                        "jitter_smoothed": jitter["keypoints"], "reduction": 1 - jitter["keypoints"] / jitter["keypoints_raw"]}
        print(f"still face, noise sigma {args.noise}: frame-to-frame motion / inter-ocular {jitter['keypoints_raw']:.4f} raw, "
              f"{jitter['keypoints']:.4f} smoothed ({100 * out['still']['reduction']:.0f}% less)")
        # moving faces with ground truth: the same clip, smoothed or not, per-frame detection or the fast path
        moving = {}
        ks = [int(k) for k in args.detect_every.split(",")]
        for k in ks:
            assert annotate.main([str(clip), "--out", f"{tmp}/moving{k}", "--detect-every", str(k), "-q", *args.extra.split()]) == 0
            df = pd.read_parquet(f"{tmp}/moving{k}")
            gt = truth[df.frame_index.to_numpy()]
            for col in ("keypoints_raw", "keypoints"):
                kp = np.stack(df[col].to_numpy()).reshape(-1, 68, 2)
                moving[f"detect_every_{k}/{col}"] = float(nme(kp, gt).mean())
            moving[f"detect_every_{k}/frames_with_a_face"] = int(df.frame_index.nunique())
        out["moving"] = moving
        for k in ks:
            r, s = moving[f"detect_every_{k}/keypoints_raw"], moving[f"detect_every_{k}/keypoints"]
            print(f"moving faces ({clip.name}), detect every {k}: NME raw {r:.4f}, smoothed {s:.4f} ({100 * (s / r - 1):+.1f}%), "
                  f"{moving[f'detect_every_{k}/frames_with_a_face']} frames with a face")
        base = moving[f"detect_every_{ks[0]}/keypoints"]
        for k in ks[1:]:
            fast = moving[f"detect_every_{k}/keypoints"]
            print(f"fast path (detect every {k}) vs every {ks[0]}: NME {fast:.4f} vs {base:.4f} ({100 * (fast / base - 1):+.1f}%)")
    return out


def _scores(detector, images) -> list:
    return [detector.detect(im).scores for im in images]


def _labelled_records(args: argparse.Namespace) -> list:
    """Every ``--every``-th labelled training face of the ``--data`` sources (never AFW)."""
    from fkp_core.dataset import DatasetError, parse_source

    try:
        sources = [parse_source(spec) for spec in args.data or []]
        records = [r for src in sources for r in (src.read("training") if src.kind == "course" else src.read())][:: args.every]
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    refuse_validation_sources(sources)
    return records


def _clip_faces(det, video: str, thresholds: list[float]) -> dict:
    """Per threshold: faces on the clip in all and the most in one frame."""
    from fkp_core.video import read_frames

    per_frame = _scores(det, (f.image for f in read_frames(video, 0, None, gray=True)))
    return {f"{t:g}": {"faces": int(sum((s >= t).sum() for s in per_frame)), "most_in_a_frame": int(max((s >= t).sum() for s in per_frame))}
            for t in thresholds}


def _labelled_best_scores(det, records: list) -> list[float]:
    """Per labelled face: the score of the detection whose crop overlaps it best (IoU >= 0.3), else 0."""
    import numpy as np

    from fkp_core.dataset import read_image
    from fkp_core.detector import iou
    from fkp_core.transforms import face_frame

    best = []
    for r in records:
        found = det.detect(read_image(r.image_path))
        crops, _ = det.calibration.crop_regions(found)
        overlap = iou(crops, face_frame(r.keypoints)[0][None])[:, 0] if len(found) else np.zeros(0)
        best.append(float(found.scores[overlap.argmax()]) if len(found) and overlap.max() >= 0.3 else 0.0)
    return best


def _print_detector_entry(entry: dict, n_records: int) -> None:
    print(f"{Path(entry['model']).name}: labelled faces found ({n_records}): "
          + ", ".join(f"{t}: {v:.4f}" for t, v in entry["labelled_found"].items() if v is not None))
    for clip, row in entry["clips"].items():
        print(f"  {clip}: " + ", ".join(f"{t}: {v['faces']} (max {v['most_in_a_frame']}/frame)" for t, v in row.items()))


def bench_detector(args: argparse.Namespace) -> dict:
    """Per threshold: faces on each clip (total, most in one frame) and the share of labelled faces found."""
    import cv2
    import numpy as np

    from fkp_core.detector import YUNET_MODEL, YuNetConfig, YuNetDetector

    cv2.setNumThreads(1)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not thresholds or min(thresholds) < 0 or max(thresholds) > 1:
        raise UsageError("--thresholds: comma-separated numbers in [0, 1]")
    records = _labelled_records(args)
    results = []
    for model in args.yunet_model or [str(YUNET_MODEL)]:
        det = YuNetDetector(YuNetConfig(model=model, score_threshold=min(thresholds)))
        entry = {"model": model, "clips": {Path(video).name: _clip_faces(det, video, thresholds) for video in args.videos},
                 "labelled_found": {}}
        best = _labelled_best_scores(det, records)
        entry["labelled_found"] = {f"{t:g}": float(np.mean(np.asarray(best) >= t)) if best else None for t in thresholds}
        results.append(entry)
        _print_detector_entry(entry, len(records))
    return {"what": "detector", "machine": _machine(), "command": args.command, "results": results}


def run(args: argparse.Namespace) -> int:
    fn = {"annotate": bench_annotate, "model": bench_model, "smoothing": bench_smoothing, "detector": bench_detector,
          "finalize": bench_memory.bench_finalize}[args.what]
    _save(args, fn(args))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.bench", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
