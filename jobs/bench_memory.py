"""Peak memory of finishing a video (stitching its segments into the part file) against the video's length.

    python -m jobs.bench finalize --minutes 30,60,120 --faces 5 --json docs/bench/finalize-memory.json

No decoding: the segment files of a synthetic video (``--faces`` faces on every frame, each a track that
crosses every segment boundary, a scene cut every ``--cut-minutes``) are generated into a temporary output
folder, then a child process finishes the video and reports its own peak resident memory
(``resource.getrusage``), so generating the data never counts. ``--in-memory`` lengths also run the
all-rows-at-once finish (fkp_core.segments.finish_video) for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

from jobs.common import positive_float, positive_int

SYNTHETIC_FPS = 30.0
SYNTHETIC_SIZE = (1920, 1080)


def add_parser(sub, formatter_class) -> argparse.ArgumentParser:
    f = sub.add_parser("finalize", help="peak memory of finishing a synthetic video, by its length (no decoding)",
                       formatter_class=formatter_class)
    f.add_argument("--minutes", default="30,60,120", help="comma-separated video lengths in minutes")
    f.add_argument("--faces", type=positive_int, default=5, help="faces on every frame")
    f.add_argument("--segment-frames", type=positive_int, default=1800, help="frames per segment (the job's automatic maximum)")
    f.add_argument("--cut-minutes", type=positive_float, default=10.0, help="a scene cut this often (tracks restart there)")
    f.add_argument("--in-memory", default="", help="comma-separated lengths (minutes) to also finish all in memory")
    return f


def _segment_rows(start: int, end: int, faces: int, cut_every: int):
    """Rows of frames [start, end): every face a smoothly moving track, local ids restarting at each cut."""
    import numpy as np

    from fkp_core.constants import NUM_KEYPOINTS
    from fkp_core.tables import FaceColumns

    frames = np.arange(start, end)
    rng = np.random.default_rng(start)
    template = np.random.default_rng(0).normal(0, 30, (NUM_KEYPOINTS, 2))
    n = len(frames) * faces
    frame = np.repeat(frames, faces)
    face = np.tile(np.arange(faces), len(frames))
    centre = np.stack([200 + 350 * face + 40 * np.sin(frame / 50 + face), 500 + 30 * np.cos(frame / 70 + face)], axis=1)
    kp = (template[None] + centre[:, None] + rng.normal(0, 1.0, (n, NUM_KEYPOINTS, 2))).astype(np.float32)
    shot = frame // cut_every
    box = np.stack([centre[:, 0] - 60, centre[:, 1] - 60, np.full(n, 120), np.full(n, 120)], axis=1).astype(np.int32)
    cols = FaceColumns(frame.astype(np.int64), frame / SYNTHETIC_FPS, face.astype(np.int32), (shot * faces + face).astype(np.int64),
                       box, np.ones(n, bool), np.ones(n, np.float32), kp.copy(), kp, np.zeros((n, 3), np.float32))
    cuts = [int(f) for f in frames if f and f % cut_every == 0]
    return cols, cuts


def generate(out_dir: str, minutes: float, faces: int, segment_frames: int, cut_minutes: float) -> dict:
    """Write a synthetic video's segment files (one at a time); -> the plan the child finishes."""
    from fkp_core.records import Segment, SegmentResult
    from fkp_core.store import open_output

    out = open_output(out_dir)
    frames = int(minutes * 60 * SYNTHETIC_FPS)
    cut_every = max(1, int(cut_minutes * 60 * SYNTHETIC_FPS))
    segments = [Segment(s, min(s + segment_frames, frames)) for s in range(0, frames, segment_frames)]
    for seg in segments:
        cols, cuts = _segment_rows(seg.start, seg.end, faces, cut_every)
        result = SegmentResult(seg.start, seg.end, frames=seg.end - seg.start, decoded=seg.end - seg.start, faces=len(cols), cuts=cuts)
        out.write_segment("synthetic", "synthetic.mp4", result, cols)
    return {"out": out_dir, "frames": frames, "segments": [[s.start, s.end] for s in segments]}


def child(plan_json: str, in_memory: bool) -> dict:
    """Finish the generated video here; -> its figures, with this process's peak RSS."""
    from fkp_core.records import Segment, VideoPlan, VideoProbe
    from fkp_core.segments import AnnotateSettings, finish_stored, finish_video
    from fkp_core.store import open_output

    spec = json.loads(plan_json)
    out = open_output(spec["out"])
    plan = VideoPlan("synthetic.mp4", "synthetic", VideoProbe(spec["frames"], SYNTHETIC_FPS, *SYNTHETIC_SIZE),
                     segments=[Segment(*s) for s in spec["segments"]])
    settings = AnnotateSettings(model="synthetic", model_name="synthetic")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if in_memory:
        loaded = [out.read_segment(plan.video_id, s) for s in plan.segments]
        record, _ = finish_video(plan, settings, [r for r, _ in loaded], [c for _, c in loaded])
    else:
        record = finish_stored(out, plan, settings)
    return {"rows": record.faces, "tracks": record.tracks, "seconds": time.perf_counter() - t0,
            "rss_before_mb": before / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_finalize(args: argparse.Namespace) -> dict:
    in_memory = {float(m) for m in args.in_memory.split(",") if m.strip()}
    runs = []
    for minutes in [float(m) for m in args.minutes.split(",") if m.strip()]:
        for mode in ["streamed"] + (["in-memory"] if minutes in in_memory else []):
            with tempfile.TemporaryDirectory() as tmp:
                spec = generate(f"{tmp}/out", minutes, args.faces, args.segment_frames, args.cut_minutes)
                code = "import sys, json; from jobs.bench_memory import child; print(json.dumps(child(sys.argv[1], sys.argv[2] == '1')))"
                done = subprocess.run([sys.executable, "-c", code, json.dumps(spec), "1" if mode == "in-memory" else "0"],
                                      capture_output=True, text=True, check=True)
            run = {"minutes": minutes, "faces": args.faces, "frames": spec["frames"], "segments": len(spec["segments"]),
                   "mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(f"{minutes:g} min, {args.faces} faces/frame ({run['rows']} rows, {run['segments']} segments), {mode}: "
                  f"peak RSS {run['peak_rss_mb']:.0f} MB (after imports {run['rss_before_mb']:.0f} MB), {run['seconds']:.1f} s")
    return {"what": "finalize", "command": args.command, "fps": SYNTHETIC_FPS, "segment_frames": args.segment_frames, "runs": runs}
