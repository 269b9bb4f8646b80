"""Annotate videos (and images) with 68 facial keypoints per face per frame, on Ray; Parquet out.

    python -m jobs.annotate videos/ --out landmarks.parquet [--render out/ --filter sunglasses]

Each video is cut into segments of consecutive frames (fkp_core.segments plans them), so one long
video spreads over every worker. A pool of annotator actors, each holding the CNN it loaded once,
takes segments one after another: decode, detect, crop, CNN, track, smooth, pose, and the rows
written atomically under OUT/_segments (fkp_core.store). When a video's segments are all in, an
annotator finishes it: track ids stitched across boundaries, OUT/part-<video_id>.parquet and the
video's status record. On GPU clusters the annotators send their crops to model actors that batch
them across segments. This module is the Ray layer only: the library does the work.

Re-running the same command finishes what an interrupted run left (finished videos and written
segments are skipped), never duplicating rows. Exit codes: 0 all videos ok, 1 some video failed
or was only partly decoded, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from fkp_core.constants import MIN_FACE_CONFIDENCE
from fkp_core.records import Segment, VideoPlan
from fkp_core.segments import MAX_SEGMENT_FRAMES, MIN_SEGMENT_FRAMES
from jobs.annotate_support import (
    Annotator,
    ModelActor,
    NetworkExport,
    Progress,
    RunState,
    Settings,
    Work,
    check_resources,
    progress_key,
    remove_if_empty,
    summary,
)
from jobs.annotate_support import check_args as _check_args
from jobs.annotate_support import plan_video_in as _plan
from jobs.annotate_support import select as _select
from jobs.common import (
    Parser,
    OutputLock,
    UsageError,
    add_common_flags,
    add_detector_flags,
    add_view_flags,
    cluster_node_count,
    init_ray,
    non_negative_int,
    positive_float,
    unit_interval,
    positive_int,
    run_main,
    use_gpus,
)

__all__ = ["Segment", "VideoPlan", "build_parser", "main", "progress_key", "segment_name"]
log = logging.getLogger("fkp.annotate")

def segment_name(start: int, end: int | None) -> str:
    """The file name of a segment under OUT/_segments/<video_id>/ (fkp_core.store owns the layout)."""
    from fkp_core.store import segment_name as name

    return name(start, end)


ACTOR_NAMESPACE = "fkp"  # model actors are named fkp-model-<run>-<i> here (ray list actors, ray.get_actor)
MODEL_ACTOR_CPUS = 0.5  # a CPU model actor's share (GPU model actors take a whole CPU)


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
                   "'default' (the most accurate), 'hm' (the former default), 'fast' or 'fastest' (smaller networks distilled "
                   "from the default, for speed; what each costs and scores: README, Accuracy); default: default")
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
    add_view_flags(g)
    g.add_argument("--min-confidence", type=unit_interval, default=MIN_FACE_CONFIDENCE, metavar="C",
                   help=f"drop faces whose confidence (the confidence column: detector score, keypoint scores and fit, "
                        f"fkp_core.confidence) is below C; they are neither written nor tracked. 0 keeps every face "
                        f"(default: {MIN_FACE_CONFIDENCE})")
    g.add_argument("--no-smooth", action="store_true", help="do not smooth keypoints over time (the raw CNN output is kept in keypoints_raw either way)")
    g = p.add_argument_group("resources")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the CNN runs; auto: on GPU model actors when the cluster has GPUs")
    g.add_argument("--model-actors", type=non_negative_int, default=None,
                   help="model actors that batch face crops across segments (default: one per GPU on GPU clusters, 0 on CPU = the CNN runs inside each annotator)")
    g.add_argument("--cpus-per-segment", type=positive_float, default=1.0, help="CPUs reserved per annotator (one segment at a time each)")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local Ray instance when no RAY_ADDRESS is set (default: all)")
    g.add_argument("--max-retries", type=non_negative_int, default=3, help="times Ray re-runs a segment whose annotator died")
    add_common_flags(p)
    return p


# ------------------------------------------------------------------------------------------
# the Ray layer: annotator actors (jobs.annotate_support.Annotator: the CNN loaded once, in __init__), fed from a pool
# ------------------------------------------------------------------------------------------


def _start_pool(args: argparse.Namespace, settings: Settings, resources: dict, use_gpu: bool, n_model: int, work: int):
    """-> (ActorPool of annotators, every actor started). Annotators fill the CPUs the model actors leave (none waits for
    a CPU that never frees), at most one per piece of work."""
    import ray
    from ray.util import ActorPool

    run_id = f"{os.getpid()}-{int(time.time())}"
    models = [
        ray.remote(ModelActor).options(
            num_cpus=1 if use_gpu else MODEL_ACTOR_CPUS, num_gpus=1 if use_gpu else 0, max_restarts=-1, max_task_retries=-1,
            max_concurrency=64, name=f"fkp-model-{run_id}-{i}", namespace=ACTOR_NAMESPACE,
        ).remote(settings.model, settings.device)
        for i in range(n_model)
    ]
    free = resources.get("CPU", 1) - (0 if use_gpu else MODEL_ACTOR_CPUS * n_model)
    n = max(1, min(work, int(free / args.cpus_per_segment)))
    annotator = ray.remote(Annotator).options(num_cpus=args.cpus_per_segment, max_restarts=-1,
                                              max_task_retries=args.max_retries)
    annotators = [annotator.remote(settings, models[i % n_model] if models else None) for i in range(n)]
    return ActorPool(annotators), models + annotators


def _submit(pool, work: Work, progress, exported) -> None:
    pool.submit(lambda a, w: a.call.options(name=w.kind).remote(w, progress, exported), work)


def _drive(pool, state: RunState, first: list[Work], progress, bar, exported) -> None:
    """Hand out work until none is left: what comes back may make more (a video's last segment -> its finish)."""
    import ray

    for work in first:
        _submit(pool, work, progress, exported)
    while pool.has_next():
        try:
            done = pool.get_next_unordered(timeout=None if progress is None else 0.5)
        except TimeoutError:
            _show(bar, state, progress)
            continue
        except ray.exceptions.RayError as exc:  # an annotator lost for good: its input is failed at the end
            log.warning("an annotator call failed: %s", str(exc).strip().splitlines()[-1])
            continue
        for work in state.on_done(done):
            _submit(pool, work, progress, exported)
        _show(bar, state, progress)


def _show(bar, state: RunState, progress) -> None:
    import ray

    partial = ray.get(progress.snapshot.remote()) if progress is not None else {}
    bar.n = state.frames_done + sum(n for key, n in partial.items() if key not in state.segments_done)
    bar.set_postfix(videos=f"{len(state.records)}", refresh=False)
    bar.refresh()


def _join_cluster(args: argparse.Namespace, paths: list, out, settings: Settings) -> tuple[dict, bool, int, Settings]:
    """Start or join Ray and check what needs it. -> (resources, GPUs used, model actors, settings for the workers)."""
    from fkp_core.store import open_output
    from fkp_core.weights import is_bundled

    mode = init_ray(num_cpus=args.num_cpus, quiet=not args.verbose)
    _check_shared(out, "--out")
    _check_inputs_shared(paths, None if is_bundled(settings.model) else settings.model)
    if args.render:
        _check_shared(open_output(args.render), "--render")
    resources, use_gpu = use_gpus(args.device, mode)
    check_resources(args, resources)
    gpus = int(resources.get("GPU", 0))
    n_model = args.model_actors if args.model_actors is not None else (max(1, gpus) if use_gpu else 0)
    # with model actors every frame costs a round trip: batch frames into chunks when detecting on all of them
    settings = replace(settings, device="cuda" if use_gpu else "cpu",
                       annotate=replace(settings.annotate, chunk_frames=16 if n_model else 1))
    log.info("%d input(s); %s Ray with %d CPU / %d GPU; CNN %s", len(paths), mode, int(resources.get("CPU", 0)), gpus,
             f"on {n_model} model actor(s) ({settings.device})" if n_model else "inside each annotator (CPU)")
    return resources, use_gpu, n_model, settings


def _probe_and_plan(args, out, settings: Settings, state: RunState, todo: list[VideoPlan], slots: int) -> list[Work]:
    """Probe every input in parallel tasks, record the unusable ones, cut the rest into segments."""
    import ray

    from fkp_core.segments import probe_video

    probe = ray.remote(probe_video).options(num_cpus=0.25, max_retries=args.max_retries)
    work = []
    for plan, info in zip(todo, ray.get([probe.remote(p.path) for p in todo])):
        if isinstance(info, str):
            state.fail(plan, info)
            continue
        _plan(plan, info, out, settings, slots)
        state.remaining[plan.video_id] = len(plan.segments)
        work += [Work("run_segment", plan, s) for s in plan.segments]
    return work


def _run_on_ray(args: argparse.Namespace, paths: list, out, settings: Settings, state: RunState,
                to_render: list, todo: list[VideoPlan]) -> float:
    """Probe, plan, and let a pool of annotators do the work. -> seconds, Ray's start-up excluded."""
    import ray
    from tqdm import tqdm

    export = NetworkExport(args, settings)
    resources, use_gpu, n_model, settings = _join_cluster(args, paths, out, settings)
    started = time.perf_counter()
    slots = max(1, int(resources.get("CPU", 1) / args.cpus_per_segment))
    first = [Work("render", None, record=r) for r in to_render] + _probe_and_plan(args, out, settings, state, todo, slots)
    bar = tqdm(total=sum(p.info.frames for p in todo if p.info), unit="frame", disable=args.quiet or not todo,
               dynamic_ncols=True, desc="annotate")
    # segments report frames as they go, so the bar moves within a segment, not a whole segment at a time
    progress = ray.remote(Progress).options(num_cpus=0).remote() if not bar.disable else None
    exported = export.ref(n_model) if first else None  # the CNN for CPU annotators, sent with each call
    pool, actors = _start_pool(args, settings, resources, use_gpu, n_model, len(first)) if first else (None, [])
    try:
        if pool is not None:
            _drive(pool, state, first, progress, bar, exported)
    finally:
        bar.close()
        for actor in ([progress] if progress is not None else []) + actors:  # their CPUs free for the next run
            ray.kill(actor)
    for plan in todo:  # an input whose calls were lost (an annotator that could not be restarted)
        if plan.info and plan.video_id not in state.records:
            state.fail(plan, "segment task failed: its annotator was lost")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------
# the driver: checks, resume, summary
# ------------------------------------------------------------------------------------------


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
    from jobs.report import write_run_report  # OUT/_report.html: per-video table, totals, keypoint thumbnails

    plans = [VideoPlan(str(p), video_id(p)) for p in paths]
    records, to_render, todo = _select(plans, out, args)
    state = RunState(out, settings, [], bool(args.render))
    state.records.update(records)
    # nothing left to do (a re-run of a finished command): no Ray at all
    elapsed = _run_on_ray(args, paths, out, settings, state, to_render, todo) if todo or to_render else 0.0
    out.write_videos_table()
    write_run_report(out, quiet=args.quiet)
    return summary(args, out, [state.records[p.video_id] for p in plans if p.video_id in state.records], plans,
                    state.frames_done, elapsed)


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.annotate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
