"""Make the bundled sample clip (examples/sample.mp4) and its ground truth from the course test images.

    python -m jobs.make_sample --data ../shared/data/fkp --out examples

Each shot is one labelled test image filmed by a virtual camera that pans, zooms and rolls
smoothly; shots are joined by hard cuts. The true keypoints of every frame are the image's
labels moved by the same camera transform, written to sample_truth.csv (frame, x0, y0, ...,
x67, y67), so tests and newcomers can check the job against known positions. Images are
picked by a fixed rule (every k-th labelled test image, keeping those the Haar detector finds),
never by how well the model does on them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from jobs.common import EXIT_OK, Parser, Ranged, UsageError, add_common_flags, positive_int, run_main

log = logging.getLogger("fkp.make_sample")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.make_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="course-layout folder (default: $FKP_DATA/fkp, else ./data)")
    p.add_argument("--out", default="examples", help="folder for sample.mp4 and sample_truth.csv")
    p.add_argument("--shots", type=positive_int, default=8, help="number of shots (one test image each)")
    p.add_argument("--frames-per-shot", type=positive_int, default=40, help="frames in each shot")
    p.add_argument("--size", type=positive_int, default=320, help="frame side in pixels")
    p.add_argument("--fps", type=positive_int, default=25, help="frame rate")
    p.add_argument("--crf", type=Ranged(int, 0, 51), default=26, help="H.264 quality (lower is better and larger)")
    add_common_flags(p)
    return p


def camera(t: float, shot: int, size: int, face_center, face_side: float):
    """3x3 matrix image -> frame at time t in [0, 1] of a shot: a smooth pan, zoom and roll."""
    import numpy as np

    phase = shot * 1.7
    zoom = (size * 0.42 / face_side) * (1.0 + 0.12 * math.sin(math.pi * t + phase))
    angle = math.radians(7.0 * math.sin(2 * math.pi * t * 0.8 + phase))
    dx = face_side * 0.10 * math.sin(2 * math.pi * t + phase)
    dy = face_side * 0.06 * math.cos(2 * math.pi * t * 0.7 + phase)
    cx, cy = face_center[0] + dx, face_center[1] + dy
    c, s = math.cos(angle) * zoom, math.sin(angle) * zoom
    # rotate/scale about (cx, cy), then put that point at the frame centre
    return np.array([[c, s, size / 2 - c * cx - s * cy], [-s, c, size / 2 + s * cx - c * cy], [0, 0, 1]])


def run(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from fkp_core.dataset import DatasetError, read_course, read_image
    from fkp_core.detector import HaarDetector
    from fkp_core.transforms import apply_matrix
    from fkp_core.video import VideoWriter
    from jobs.train_data import default_data_dir

    data = Path(args.data) if args.data else default_data_dir()
    try:
        records = read_course(data, "test")
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    det = HaarDetector()
    step = max(1, len(records) // (args.shots * 4))
    chosen = []
    for rec in records[::step]:
        img = read_image(rec.image_path, color=True)
        c = rec.keypoints.mean(0)
        if any(b[0] < c[0] < b[0] + b[2] and b[1] < c[1] < b[1] + b[3] for b in det.detect_boxes(img)):
            chosen.append((rec, img))
        if len(chosen) == args.shots:
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with VideoWriter(out / "sample.mp4", args.fps, args.size, args.size, crf=args.crf) as writer:
        frame_index = 0
        for shot, (rec, img) in enumerate(chosen):
            kp = rec.keypoints
            side = float(np.ptp(kp, axis=0).max())
            for k in range(args.frames_per_shot):
                m = camera(k / max(1, args.frames_per_shot - 1), shot, args.size, kp.mean(0), side)
                frame = cv2.warpAffine(img, m[:2], (args.size, args.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                writer.write(frame)
                rows.append([frame_index, *apply_matrix(m, kp).ravel().tolist()])
                frame_index += 1
    header = "frame," + ",".join(f"{a}{i}" for i in range(68) for a in ("x", "y"))
    lines = [header] + [f"{int(r[0])}," + ",".join(f"{v:.1f}" for v in r[1:]) for r in rows]
    (out / "sample_truth.csv").write_text("\n".join(lines) + "\n")
    sources = ", ".join(r.image_path.name for r, _ in chosen)
    (out / "SOURCES.txt").write_text(
        "sample.mp4 and sample_truth.csv were made by `python -m jobs.make_sample` from these labelled test images of\n"
        "the Udacity facial keypoint data set (YouTube Faces frames; udacity/P1_Facial_Keypoints, MIT):\n" + sources + "\n"
    )
    size_kb = (out / "sample.mp4").stat().st_size / 1024
    print(f"wrote {out / 'sample.mp4'} ({frame_index} frames, {size_kb:.0f} KB) and {out / 'sample_truth.csv'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.make_sample", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
