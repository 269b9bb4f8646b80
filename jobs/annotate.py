"""Annotate videos (and images) with 68 facial keypoints per face per frame, on Ray; Parquet out.

    python -m jobs.annotate videos/ --out landmarks.parquet [--render out/ --filter sunglasses]

Each video is cut into segments of ``--segment-frames`` consecutive frames, so one long video
spreads over every worker. A segment task decodes its frames, detects faces (Haar), crops them
and runs the CNN (in the task on CPU; on GPU clusters through model actors that batch the crops
of many segments), and writes its rows atomically under OUT/_segments. When a video's segments
are all there, a finalize task stitches track ids across segment boundaries, smooths each track,
estimates head pose and writes OUT/part-<video_id>.parquet and the video's status record; the
per-video table OUT/_videos.parquet is rebuilt from those records at the end of every run.

Re-running the same command finishes what an interrupted run left (finished videos and written
segments are skipped), never duplicating rows. Exit codes: 0 all videos ok, 1 some video failed
or was only partly decoded, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fkp_core.constants import MIN_FACE_CONFIDENCE
from jobs.annotate_support import (
    Progress,
    check_resources,
    not_outputs,
    progress_key,
    remove_if_empty,
    source_identity,
)
from jobs.common import (
    EXIT_FAILED,
    EXIT_OK,
    Parser,
    OutputLock,
    UsageError,
    add_common_flags,
    add_detector_flags,
    cluster_node_count,
    detector_spec,
    check_model_arg,
    check_writable_dir,
    init_ray,
    load_model_arg,
    non_negative_int,
    positive_float,
    positive_int,
    run_main,
    unit_interval,
    use_gpus,
)

log = logging.getLogger("fkp.annotate")

MAX_SEGMENT_FRAMES = 1800  # the automatic segment size: a minute at 30 fps at most (what a retry redoes) ...
MIN_SEGMENT_FRAMES = 150  # ... and not so short that seeking and start-up dominate
ACTOR_NAMESPACE = "fkp"  # model actors are named fkp-model-<run>-<i> here (ray list actors, ray.get_actor)
PROGRESS_EVERY = 10  # frames between a segment's progress reports


def build_parser() -> argparse.ArgumentParser:
    from fkp_core.filters import FILTERS

    p = Parser(prog="python -m jobs.annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video/image files, directories (searched recursively) or glob patterns; local paths or "
                        "pyarrow filesystem URIs (s3://bucket/videos/, gs://..., file:///...); files under --out and "
                        "--render are never inputs")
    p.add_argument("--out", required=True, help="output folder (local path or pyarrow filesystem URI such as s3://bucket/run); "
                   "one run at a time: a second run on the same folder is refused while the first is alive")
    p.add_argument("--render", metavar="DIR", default=None, help="also write one annotated video (or image) per input to DIR")
    p.add_argument("--filter", default="keypoints", metavar="NAMES",
                   help=f"comma-separated overlays for --render, applied in order: {', '.join(sorted(FILTERS))}")
    p.add_argument("--model", default=None, help="model file (NAME.pt with NAME.json beside it), or a bundled model by name: "
                   "'default' (the most accurate), 'fast' or 'fastest' (~0.6x and ~0.3x its CPU time per face, at 2-4%% and "
                   "9-11%% higher NME: README, Accuracy); default: default")
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already finished in --out")
    g = p.add_argument_group("speed and accuracy")
    g.add_argument("--segment-frames", type=positive_int, default=None,
                   help=f"frames per work unit, so a long video spreads over ceil(frames / this) tasks (default: equal segments "
                        f"of at most {MAX_SEGMENT_FRAMES} frames in whole rounds over the cluster's segment slots, at least {MIN_SEGMENT_FRAMES})")
    g.add_argument("--sample-fps", type=positive_float, default=None, metavar="F",
                   help="annotate about F frames per second: the first frame at or after every 1/F s of presentation time, "
                        "with its true frame index and timestamp; tracking and smoothing run over the sampled frames "
                        "(default: every frame)")
    g.add_argument("--detect-every", type=positive_int, default=1, metavar="K",
                   help="run the face detector every K frames and track faces from their keypoints in between (fast path); 1 = detect on every frame")
    add_detector_flags(g)
    g.add_argument("--refine", type=non_negative_int, default=1, help="extra CNN passes re-cropped around the prediction on detection frames")
    g.add_argument("--min-confidence", type=unit_interval, default=MIN_FACE_CONFIDENCE, metavar="C",
                   help=f"drop faces whose confidence (the confidence column: detector score, keypoint scores and fit, "
                        f"fkp_core.confidence) is below C; they are neither written nor tracked. 0 keeps every face "
                        f"(default: {MIN_FACE_CONFIDENCE})")
    g.add_argument("--no-smooth", action="store_true", help="do not smooth keypoints over time (the raw CNN output is kept in keypoints_raw either way)")
    g = p.add_argument_group("resources")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the CNN runs; auto: on GPU model actors when the cluster has GPUs")
    g.add_argument("--model-actors", type=non_negative_int, default=None,
                   help="model actors that batch face crops across segments (default: one per GPU on GPU clusters, 0 on CPU = the CNN runs inside each segment task)")
    g.add_argument("--cpus-per-segment", type=positive_float, default=1.0, help="CPUs reserved per segment task")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local Ray instance when no RAY_ADDRESS is set (default: all)")
    g.add_argument("--max-retries", type=non_negative_int, default=3, help="times Ray re-runs a segment whose worker died")
    add_common_flags(p)
    return p


# ------------------------------------------------------------------------------------------
# settings shipped to every task
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    out: str
    model: str
    model_name: str
    device: str  # cpu | cuda (for actors); segment tasks run the CNN on CPU unless actors are used
    detector: Any  # fkp_core.detector.DetectorSpec
    annotate: Any
    smooth: bool
    render: str | None
    filters: tuple[str, ...]
    segment_frames: int | None
    sample_fps: float | None = None  # annotate only frames sampled at this rate (fkp_core.sampling)


@dataclass
class VideoPlan:
    path: str
    video_id: str
    info: dict | None = None
    error: str | None = None
    segments: list[tuple[int, int | None]] = field(default_factory=list)
    source: dict | None = None  # the input file's size and modification time (a replaced file is redone)
    changed: bool = False  # finished in OUT before, but the file at its path has changed since


def segment_name(start: int, end: int | None) -> str:
    return f"{start:010d}-{'end' if end is None else f'{end:010d}'}.parquet"


def auto_segment_frames(frames: int, slots: int) -> int:
    """Segment length for one video: a multiple of ``slots`` equal segments of at most MAX_SEGMENT_FRAMES.

    Equal segments in whole rounds keep every CPU busy to the end (5 segments on 2 CPUs would
    leave one idle for the last round).
    """
    slots = max(1, slots)
    count = -(-max(frames, 1) // MAX_SEGMENT_FRAMES)
    count = -(-count // slots) * slots
    return int(max(MIN_SEGMENT_FRAMES, -(-frames // count)))


def plan_segments(frames: int, segment_frames: int) -> list[tuple[int, int | None]]:
    """Deterministic [start, end) ranges; the last is open-ended (None: to the end of the file).

    Frame counts from containers can be off (an estimate, or a last frame whose timestamp skips
    an index): the last segment decodes whatever the file holds after its start.
    """
    if frames <= 0:
        return [(0, None)]
    segs: list[tuple[int, int | None]] = [(s, min(s + segment_frames, frames)) for s in range(0, frames, segment_frames)]
    segs[-1] = (segs[-1][0], None)
    return segs


# ------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------

_PREDICTORS: dict[tuple[str, str], Any] = {}


def _local_landmarker(model: str, device: str):
    """One network per worker process (Ray reuses workers, so it is loaded once, not per task)."""
    key = (model, device)
    if key not in _PREDICTORS:
        import torch

        from fkp_core.detector import HAAR_CALIBRATION, Detections
        from fkp_core.landmarks import Landmarker

        class _NoDetector:  # the segment task detects; this process only runs the network
            calibration = HAAR_CALIBRATION

            def detect(self, image):
                return Detections.empty()

        torch.set_num_threads(1)
        _PREDICTORS[key] = Landmarker(model, detector=_NoDetector(), device=device)
    return _PREDICTORS[key]


class ModelActor:
    """Holds the network (on a GPU when it has one) and batches crops from concurrent segment calls."""

    def __init__(self, model: str, device: str, max_batch: int = 1024):
        import torch

        if device == "cpu":
            torch.set_num_threads(1)
        self.lm = _local_landmarker(model, device)
        self.max_batch = max_batch
        self.pending: deque = deque()
        self.draining = False
        self.batches = 0
        self.crops = 0

    async def predict(self, crops):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((crops, fut))
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        import numpy as np

        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)  # let requests that arrive together join one batch
            while self.pending:
                batch, total = [], 0
                while self.pending and (not batch or total + len(self.pending[0][0]) <= self.max_batch):
                    crops, fut = self.pending.popleft()
                    batch.append((crops, fut))
                    total += len(crops)
                stacked = np.concatenate([c for c, _ in batch])
                try:
                    out = await loop.run_in_executor(None, self.lm.predict_crops, stacked)
                except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                    for _, fut in batch:
                        fut.set_exception(exc)
                    continue
                self.batches += 1
                self.crops += total
                pos = 0
                for crops, fut in batch:
                    fut.set_result(out[pos : pos + len(crops)])
                    pos += len(crops)
        finally:
            self.draining = False

    def stats(self) -> dict:
        return {"batches": self.batches, "crops": self.crops, "pid": os.getpid()}


def probe_video(path: str) -> dict:
    """Probe in a task: the info dict, or the reason the file is unusable."""
    from fkp_core.video import VideoError, probe

    try:
        info = probe(path)
    except VideoError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any unreadable input is a failed item, not a crash
        return {"error": f"{path}: {type(exc).__name__}: {exc}"}
    width, height = info.display_size  # frames are annotated as a player shows them (phones store portrait rotated)
    return {"info": {"frames": int(info.frames), "fps": float(info.fps), "width": int(width), "height": int(height),
                     "exact": bool(getattr(info, "frames_exact", True)), "vfr": bool(info.variable_rate),
                     "rotation": int(info.rotation)}}


def run_segment(path: str, video_id: str, start: int, end: int | None, frame_size: tuple[int, int], settings: Settings,
                actors: list, progress=None, sequential: bool = False) -> dict:
    """Annotate frames [start, end) of one video (smoothed and posed) and write them atomically; idempotent.

    ``progress`` (a Progress actor, or None) hears how many frames the segment has taken so far; ``sequential``:
    frames are numbered in decoding order (variable frame rate video, one segment from frame 0)."""
    import json

    import cv2
    import ray

    from fkp_core.annotator import SegmentAnnotator
    from fkp_core.detector import make_detector
    from fkp_core.postprocess import postprocess_segment
    from fkp_core.sampling import is_sampled, smoothing_for
    from fkp_core.tables import faces_table, open_output
    from fkp_core.video import DecodeStats, VideoError, read_frames

    out = open_output(settings.out)
    target = out.path("_segments", video_id, segment_name(start, end))
    if out.exists(target):
        try:
            meta = out.read_table(target).schema.metadata or {}
            return {**json.loads(meta[b"fkp_stats"]), "skipped": True}
        except Exception as exc:  # noqa: BLE001 - a damaged file from an earlier run is simply redone
            log.warning("%s: unreadable (%s); annotating the segment again", target, exc)
    cv2.setNumThreads(1)
    lm = _local_landmarker(settings.model, "cpu") if not actors else None
    if actors:
        actor = actors[hash((video_id, start)) % len(actors)]
        predict = lambda crops: ray.get(actor.predict.remote(crops))  # noqa: E731
        size, margin = _model_geometry(settings.model)
    else:
        predict, size, margin = lm.predict_crops, lm.size, lm.margin
    annotator = SegmentAnnotator(predict, size, margin, make_detector(settings.detector), settings.annotate)
    error = None
    previous = None
    t0, cpu0 = time.perf_counter(), time.process_time()
    first = max(0, start - 1)  # the frame before the segment tells whether a scene cut falls on the boundary

    decode = DecodeStats()
    taken = 0

    def frames():
        nonlocal previous, taken
        previous_s = None  # timestamp of the frame decoded before this one (frame sampling)
        for f in read_frames(path, first, end, gray=True, upright=True, on_error="skip", stats=decode, threads=1,
                             sequential=sequential):
            if f.index < start:
                previous, previous_s = f.image, f.timestamp_s
                continue
            taken += 1
            if progress is not None and taken % PROGRESS_EVERY == 0:
                progress.set.remote(progress_key(video_id, start), taken)
            sampled = settings.sample_fps is None or is_sampled(f.timestamp_s, previous_s, settings.sample_fps)
            previous_s = f.timestamp_s
            if sampled:
                yield f

    try:
        gen = frames()
        first_frame = next(gen, None)
        if first_frame is None:
            cols = annotator.run([])
        else:
            import itertools

            cols = annotator.run(itertools.chain([first_frame], gen), previous_frame=previous)
    except VideoError as exc:
        error = str(exc)
        cols = annotator.result()
    except Exception as exc:  # noqa: BLE001 - decoder crashes on corrupt data: record, keep the frames we have
        error = f"{path}: {type(exc).__name__}: {exc}"
        cols = annotator.result()
    if error is None and decode.errors:
        error = f"{path}: {len(decode.errors)} decoding error(s) in frames [{start}, {end if end is not None else 'end'}): {decode.errors[0]}"
    stats = annotator.stats.to_dict()
    t_post = time.perf_counter()
    cols = postprocess_segment(cols, frame_size, smooth=settings.smooth, smoothing=smoothing_for(settings.sample_fps))
    stats["seconds"]["post"] = time.perf_counter() - t_post
    stats.update({"start": start, "end": end, "error": error, "decoded": taken, "seconds_total": time.perf_counter() - t0,
                  "cpu_seconds": time.process_time() - cpu0})  # this process's CPU, all its threads
    table = faces_table(video_id, path, cols)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"fkp_stats": json.dumps(stats).encode()})
    out.write_table(target, table)
    return stats


_GEOMETRY: dict[str, tuple[int, float]] = {}


def _model_geometry(model: str) -> tuple[int, float]:
    if model not in _GEOMETRY:
        from fkp_core.model import ModelConfig
        from fkp_core.weights import read_metadata

        cfg = ModelConfig.from_dict(read_metadata(model)["config"])
        _GEOMETRY[model] = (cfg.input_size, cfg.crop_margin)
    return _GEOMETRY[model]


def finalize_video(plan: dict, settings: Settings) -> dict:
    """Segments -> one ordered part file with global track ids (smoothing redone only next to boundaries)."""
    import json

    import numpy as np

    from fkp_core.postprocess import postprocess_video
    from fkp_core.sampling import smoothing_for
    from fkp_core.tables import columns_from_table, faces_table, open_output

    cpu0 = time.process_time()
    out = open_output(settings.out)
    info = plan["info"]
    segments, cols = [], []
    errors = []
    for start, end in plan["segments"]:
        table = out.read_table(out.path("_segments", plan["video_id"], segment_name(start, end)))
        stats = json.loads((table.schema.metadata or {}).get(b"fkp_stats", b"{}"))
        segments.append(stats)
        cols.append(columns_from_table(table))
        if stats.get("error"):
            errors.append(stats["error"])
    merged = postprocess_video(cols, segments, (info["width"], info["height"]), smooth=settings.smooth,
                               smoothing=smoothing_for(settings.sample_fps))
    decoded = sum(s.get("decoded", s.get("frames", 0)) for s in segments)
    expected = info["frames"]
    truncated = expected > 0 and info.get("exact", True) and decoded < expected
    if decoded == 0:
        status = "failed"
        errors = errors or [f"{plan['path']}: no frame could be decoded"]
    elif errors or truncated:
        status = "partial"
        if truncated and not errors:
            errors = [f"{plan['path']}: decoded {decoded} of {expected} frames (file truncated?)"]
    else:
        status = "ok"
    part = out.part_path(plan["video_id"])
    if status != "failed":
        out.write_table(part, faces_table(plan["video_id"], plan["path"], merged))
    record = {
        "video_id": plan["video_id"], "path": plan["path"], "status": status, "error": "; ".join(errors) or None,
        "frames_expected": expected, "frames_decoded": decoded, "fps": info["fps"], "width": info["width"],
        "frames_annotated": sum(s.get("frames", 0) for s in segments), "sample_fps": settings.sample_fps,
        "height": info["height"], "frames_with_faces": int(len(np.unique(merged.frame_index))), "faces": int(len(merged)),
        "tracks": int(len(np.unique(merged.track_id))), "segments": len(segments),
        # CPU seconds of the segment tasks and this one (with model actors, not the actors' share of the CNN)
        "seconds": float(sum(s.get("cpu_seconds", s.get("seconds_total", 0.0)) for s in segments) + time.process_time() - cpu0),
        "output": part if status != "failed" else None, "render": None, "model": settings.model_name,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": plan.get("source"),
        "rotation": info.get("rotation", 0),
        "stage_seconds": {k: float(sum(s.get("seconds", {}).get(k, 0.0) for s in segments))
                          for k in ("decode", "detect", "cnn", "other", "post")},
    }
    out.write_json(out.status_path(plan["video_id"]), record)
    out.remove_dir(out.segment_dir(plan["video_id"]))
    return record


def render_video(record: dict, settings: Settings) -> dict:
    """Draw the chosen filters on every frame from the finished rows; one output per input."""
    from fkp_core.render import render_annotated
    from fkp_core.tables import open_output

    out = open_output(settings.out)
    rows = out.read_table(record["output"])
    target = render_annotated(record["path"], record["video_id"], rows, settings.render, settings.filters)
    record = {**record, "render": target}
    out.write_json(out.status_path(record["video_id"]), record)
    return record


def failed_record(plan: VideoPlan, settings: Settings, reason: str) -> dict:
    return {
        "video_id": plan.video_id, "path": plan.path, "status": "failed", "error": reason,
        "frames_expected": (plan.info or {}).get("frames"), "frames_decoded": 0, "fps": (plan.info or {}).get("fps"),
        "width": (plan.info or {}).get("width"), "height": (plan.info or {}).get("height"), "frames_with_faces": 0,
        "faces": 0, "tracks": 0, "segments": 0, "seconds": 0.0, "output": None, "render": None, "model": settings.model_name,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": plan.source,
        "rotation": (plan.info or {}).get("rotation"),
    }


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _check_output(out) -> None:
    probe_path = out.path(f"_write_test_{os.getpid()}")
    try:
        out.write_bytes(probe_path, b"ok")
        out.fs.delete_file(probe_path)
    except OSError as exc:
        raise UsageError(f"--out {out.uri}: not writable ({exc})") from None


def _unseen_on_nodes(paths: list[str]) -> tuple[list[str], int]:
    """Ask every alive node which of these local paths it cannot see -> (unseen paths, nodes lacking any)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def unseen(names: list[str]) -> list[str]:
        return [n for n in names if not os.path.exists(n)]

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    per_node = ray.get([unseen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths)
                        for n in nodes])
    missing = sorted({name for names in per_node for name in names})
    return missing, sum(1 for names in per_node if names)


def _check_shared(out, what: str) -> None:
    """On a multi-node cluster, every node must see the same output folder."""
    if not out.is_local or cluster_node_count() <= 1:
        return
    marker = out.path(f"_shared_check_{os.getpid()}")
    out.write_bytes(marker, b"ok")
    try:
        missing, nodes = _unseen_on_nodes([marker])
    finally:
        out.fs.delete_file(marker)
    if missing:
        raise UsageError(
            f"{what} {out.uri} is a local folder that {nodes} of {cluster_node_count()} cluster nodes cannot see: "
            "use shared storage (NFS) or an object-store URI such as s3://bucket/path"
        )


def _check_inputs_shared(paths: list, model: str | None) -> None:
    """On a multi-node cluster, every node must see the local inputs (and a --model file)."""
    if cluster_node_count() <= 1:
        return
    local = [str(p) for p in paths if isinstance(p, Path)] + ([model] if model else [])
    if not local:
        return
    missing, nodes = _unseen_on_nodes(local)
    if missing:
        raise UsageError(
            f"{len(missing)} local input(s) that {nodes} of {cluster_node_count()} cluster nodes cannot see, such as "
            f"{missing[0]}: put inputs and --model on shared storage (NFS) or name them by URI such as s3://bucket/videos/"
        )


def _settings(args: argparse.Namespace, device: str) -> Settings:
    from fkp_core.annotator import AnnotateConfig
    from fkp_core.filters import parse_filters
    from fkp_core.weights import resolve_model_path

    try:
        filters = tuple(parse_filters(args.filter))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model_path = str(resolve_model_path(args.model))
    loaded = load_model_arg(model_path, flag="--model")
    return Settings(
        out=args.out, model=model_path, model_name=f"{Path(model_path).stem} ({loaded.metadata.get('sha256', '')[:12]})",
        device=device, detector=detector_spec(args),
        annotate=AnnotateConfig(detect_every=args.detect_every, refine=args.refine, min_face_confidence=args.min_confidence),
        smooth=not args.no_smooth, render=args.render, filters=filters, segment_frames=args.segment_frames,
        sample_fps=args.sample_fps,
    )


def _is_finished(out, plan: VideoPlan, want_render: bool) -> dict | None:
    path = out.status_path(plan.video_id)
    if not out.exists(path):
        return None
    record = out.read_json(path)
    if record.get("status") not in ("ok", "partial") or not record.get("output") or not out.exists(record["output"]):
        return None
    if record.get("source") and plan.source and record["source"] != plan.source:
        plan.changed = True  # another file at the same path: its rows are not this file's
        return None
    if want_render and not (record.get("render") and os.path.exists(record["render"])):
        return {**record, "_needs_render": True}
    return record


def _check_args(args: argparse.Namespace):
    """Usage checks that need no Ray, cheapest first, creating nothing: flags, model, inputs, output, render
    folder, resources; then the model's weights are loaded once. -> (paths, out, settings)."""
    from fkp_core.filters import parse_filters
    from fkp_core.tables import open_output
    from fkp_core.video import find_media

    try:
        parse_filters(args.filter)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_resources(args, None)
    check_model_arg(args.model, "--model")
    try:
        out = open_output(args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.render:
        args.render = str(Path(args.render).resolve())
    try:
        notes: list[str] = []
        paths = not_outputs(find_media(args.inputs, notes), out, args.render)
        for note in notes:
            log.warning("%s", note)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc).strip("'\"")) from None
    if not paths:
        raise UsageError(f"no videos or images found in {' '.join(args.inputs)}")
    if out.is_local:
        check_writable_dir(out.root, "--out")
    else:
        _check_output(out)
    if args.render:
        check_writable_dir(args.render, "--render")
    return paths, out, _settings(args, "cpu")


def _select(plans: list[VideoPlan], out, args: argparse.Namespace) -> tuple[dict[str, dict], list[dict], list[VideoPlan]]:
    """Split inputs into finished (their records), finished but missing a requested render, and to do."""
    records: dict[str, dict] = {}
    to_render: list[dict] = []
    todo: list[VideoPlan] = []
    for plan in plans:
        plan.source = source_identity(plan.path)
        done = None if args.overwrite else _is_finished(out, plan, bool(args.render))
        if args.overwrite or plan.changed:
            for path in (out.status_path(plan.video_id), out.part_path(plan.video_id)):
                if out.exists(path):
                    out.fs.delete_file(path)
            out.remove_dir(out.segment_dir(plan.video_id))
            if plan.changed:
                log.warning("%s: changed since it was finished in %s (size or modification time): annotating it again",
                            plan.path, out.uri)
            todo.append(plan)
            continue
        if done is None:
            todo.append(plan)
        elif done.pop("_needs_render", False):
            to_render.append(done)
        else:
            records[plan.video_id] = done
    if len(todo) < len(plans):
        log.info("%d of %d input(s) already finished in %s (use --overwrite to redo them)", len(plans) - len(todo), len(plans), out.uri)
    return records, to_render, todo


def _plan(plan: VideoPlan, info: dict, out, settings: Settings, slots: int) -> None:
    """Cut a video into segments; drop segments an earlier run wrote with other settings."""
    plan.info = info
    seg_len = settings.segment_frames or auto_segment_frames(info["frames"], slots)
    # variable frame rate: frames are numbered in decoding order, which takes one decode from the start
    plan.segments = [(0, None)] if info.get("vfr") else plan_segments(info["frames"], seg_len)
    plan_file = out.path("_segments", plan.video_id, "plan.json")
    wanted = {"segments": [list(s) for s in plan.segments], "model": settings.model_name,
              "annotate": repr(settings.annotate), "detector": repr(settings.detector),
              "sample_fps": settings.sample_fps}
    if out.exists(plan_file) and out.read_json(plan_file) != wanted:
        log.info("%s: discarding segments written with other settings", plan.path)
        out.remove_dir(out.segment_dir(plan.video_id))
    if not out.exists(plan_file):
        out.write_json(plan_file, wanted)


def _start_actors(n: int, use_gpu: bool, settings: Settings) -> list:
    import ray

    run_id = f"{os.getpid()}-{int(time.time())}"
    return [
        ray.remote(ModelActor).options(
            num_cpus=1 if use_gpu else 0.5, num_gpus=1 if use_gpu else 0, max_restarts=-1, max_task_retries=-1,
            max_concurrency=64, name=f"fkp-model-{run_id}-{i}", namespace=ACTOR_NAMESPACE,
        ).remote(settings.model, settings.device)
        for i in range(n)
    ]


def _write_videos_table(out) -> None:
    """OUT/_videos.parquet from every status record in OUT (earlier runs included)."""
    from fkp_core.tables import videos_table

    records = [out.read_json(f) for f in out.listdir(out.path("_status")) if f.endswith(".json")]
    out.write_table(out.path("_videos.parquet"), videos_table(sorted(records, key=lambda r: r["path"])))


def _run_on_ray(args: argparse.Namespace, paths: list, out, settings: Settings, plans: list[VideoPlan],
                records: dict[str, dict], to_render: list[dict], todo: list[VideoPlan]) -> tuple[int, float]:
    """Start or join Ray and do the work: probe, segments, finalize, render. Fills ``records``.

    -> (frames annotated, seconds since the work started, Ray's start-up excluded)."""
    import ray
    from tqdm import tqdm

    from fkp_core.tables import open_output
    from fkp_core.weights import is_bundled

    mode = init_ray(num_cpus=args.num_cpus, quiet=not args.verbose)
    _check_shared(out, "--out")
    _check_inputs_shared(paths, None if is_bundled(settings.model) else settings.model)
    if args.render:
        _check_shared(open_output(args.render), "--render")
    resources, use_gpu = use_gpus(args.device, mode)
    check_resources(args, resources)
    gpus = int(resources.get("GPU", 0))
    n_actors = args.model_actors if args.model_actors is not None else (max(1, gpus) if use_gpu else 0)
    # with model actors every frame costs a round trip: batch frames into chunks when detecting on all of them
    settings = replace(settings, device="cuda" if use_gpu else "cpu",
                       annotate=replace(settings.annotate, chunk_frames=16 if n_actors else 1))
    log.info("%d input(s); %s Ray with %d CPU / %d GPU; CNN %s", len(paths), mode, int(resources.get("CPU", 0)), gpus,
             f"on {n_actors} model actor(s) ({settings.device})" if n_actors else "inside each segment task (CPU)")

    actors = _start_actors(n_actors, use_gpu, settings) if n_actors and todo else []
    probe_remote = ray.remote(probe_video).options(num_cpus=0.25, max_retries=args.max_retries)
    segment_remote = ray.remote(run_segment).options(num_cpus=args.cpus_per_segment, max_retries=args.max_retries)
    finalize_remote = ray.remote(finalize_video).options(num_cpus=0.25, max_retries=args.max_retries)
    render_remote = ray.remote(render_video).options(num_cpus=1, max_retries=args.max_retries)

    started = time.perf_counter()
    slots = max(1, int(resources.get("CPU", 1) / args.cpus_per_segment))
    queue: deque = deque()
    for plan, probed in zip(todo, ray.get([probe_remote.remote(p.path) for p in todo])):
        if "error" in probed:
            records[plan.video_id] = failed_record(plan, settings, probed["error"])
            out.write_json(out.status_path(plan.video_id), records[plan.video_id])
            continue
        _plan(plan, probed["info"], out, settings, slots)
        queue.extend((plan, start, end) for start, end in plan.segments)

    remaining = {p.video_id: len(p.segments) for p in todo if p.info}
    broken: dict[str, str] = {}  # video -> error of a segment task that raised (a bug, not bad data)
    max_inflight = max(4, 2 * slots)
    inflight: dict = {}
    frames_done = 0
    bar = tqdm(total=sum(p.info["frames"] for p in todo if p.info), unit="frame", disable=args.quiet or not todo,
               dynamic_ncols=True, desc="annotate")
    # segments report frames as they go, so the bar moves within a segment, not a whole segment at a time
    progress = ray.remote(Progress).options(num_cpus=0).remote() if not bar.disable else None
    running: dict = {}  # segment ref -> its progress key

    def show_progress() -> None:
        partial = ray.get(progress.snapshot.remote()) if progress is not None and running else {}
        bar.n = frames_done + sum(partial.get(key, 0) for key in running.values())
        bar.refresh()

    def submit_segments() -> None:
        while queue and len(inflight) < max_inflight:
            plan, start, end = queue.popleft()
            size = (plan.info["width"], plan.info["height"])
            ref = segment_remote.remote(plan.path, plan.video_id, start, end, size, settings, actors, progress,
                                        bool(plan.info.get("vfr")))
            inflight[ref] = ("segment", plan)
            running[ref] = progress_key(plan.video_id, start)

    for record in to_render:
        inflight[render_remote.remote(record, settings)] = ("render", record)
    submit_segments()
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=None if progress is None else 0.5)
            if not ready:
                show_progress()
                continue
            ref = ready[0]
            kind, obj = inflight.pop(ref)
            running.pop(ref, None)
            vid = obj.video_id if isinstance(obj, VideoPlan) else obj["video_id"]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # one input's failure never stops the others
                error = f"{kind} task failed: {str(exc).strip().splitlines()[-1]}"
                if kind == "segment":
                    broken.setdefault(vid, error)
                    result = {}
                else:
                    plan = obj if isinstance(obj, VideoPlan) else VideoPlan(obj["path"], vid, info=None)
                    records[vid] = failed_record(plan, settings, error) if kind == "finalize" else {**obj, "error": error}
                    out.write_json(out.status_path(vid), records[vid])
                    submit_segments()
                    continue
            if kind == "segment":
                frames_done += result.get("frames", 0)
                if progress is not None:
                    show_progress()
                remaining[vid] -= 1
                if remaining[vid] == 0 and vid in broken:
                    records[vid] = failed_record(obj, settings, broken[vid])
                    out.write_json(out.status_path(vid), records[vid])
                elif remaining[vid] == 0:
                    inflight[finalize_remote.remote(asdict_plan(obj), settings)] = ("finalize", obj)
            elif kind == "finalize":
                records[vid] = result
                if args.render and result["status"] != "failed":
                    inflight[render_remote.remote(result, settings)] = ("render", result)
                bar.set_postfix(videos=f"{len(records)}/{len(plans)}", refresh=False)
            else:
                records[vid] = result
            submit_segments()
    finally:
        bar.close()
        if progress is not None:
            ray.kill(progress)
    return frames_done, time.perf_counter() - started


def run(args: argparse.Namespace) -> int:
    paths, out, settings = _check_args(args)
    existed = out.exists(out.root)
    try:
        with OutputLock(out, args.command):  # one run at a time per --out: a second one is refused (exit 2)
            code = _run(args, paths, out, settings)
            remove_if_empty(out, out.path("_segments"))  # every video's segments were stitched: no empty folder left
            return code
    except UsageError:  # one found once Ray was up (cluster checks, resources): leave no new empty --out behind
        if not existed:
            remove_if_empty(out, out.root)
        raise


def _run(args: argparse.Namespace, paths: list, out, settings: Settings) -> int:
    from fkp_core.video import video_id

    plans = [VideoPlan(str(p), video_id(p)) for p in paths]
    records, to_render, todo = _select(plans, out, args)
    # nothing left to do (a re-run of a finished command): no Ray at all
    frames_done, elapsed = _run_on_ray(args, paths, out, settings, plans, records, to_render, todo) if todo or to_render else (0, 0.0)
    _write_videos_table(out)
    from jobs.report import write_run_report  # OUT/_report.html: per-video table, totals, keypoint thumbnails
    write_run_report(out, quiet=args.quiet)

    mine = [records[p.video_id] for p in plans if p.video_id in records]
    counts = {s: sum(1 for r in mine if r["status"] == s) for s in ("ok", "partial", "failed")}
    for r in mine:
        if r["status"] != "ok" or r.get("error"):
            log.warning("%s: %s", r["status"], r.get("error") or r["path"])
    fps = frames_done / elapsed if elapsed > 0 else 0.0
    changed = sum(p.changed for p in plans)
    print(
        f"{len(mine)} input(s): {counts['ok']} ok, {counts['partial']} partial, {counts['failed']} failed; "
        f"{frames_done} frames annotated this run, {sum(r.get('faces') or 0 for r in mine)} faces in total; "
        f"{elapsed:.1f} s ({fps:.1f} frames/s); tables in {out.uri}" + (f", videos in {args.render}" if args.render else "")
        + (f"; {changed} input(s) changed since they were finished here, so annotated again" if changed else "")
    )
    ok = counts["partial"] == 0 and counts["failed"] == 0 and not any(r.get("error") for r in mine if r["status"] == "ok")
    return EXIT_OK if ok else EXIT_FAILED


def asdict_plan(plan: VideoPlan) -> dict:
    return {"path": plan.path, "video_id": plan.video_id, "info": plan.info, "segments": plan.segments, "source": plan.source}


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.annotate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
