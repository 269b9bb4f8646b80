"""Driver-side bookkeeping of jobs.annotate: progress within segments, which inputs changed, which files are
fkp's own outputs, resources no node has, tidying the output folder; the work handed to annotator actors and
the run's state; the GPU model actor. No Ray at import time."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from fkp_core.records import VideoPlan, VideoProbe
from fkp_core.segments import AnnotateSettings
from jobs.common import EXIT_FAILED, EXIT_OK, UsageError, check_model_arg, check_writable_dir, detector_spec, load_model_arg

log = logging.getLogger("fkp.annotate")


class Progress:
    """Frames each running segment has taken so far, for the driver's progress bar (a retried segment starts again
    from 0, since it sets its count rather than adding to it)."""

    def __init__(self):
        self.frames: dict[str, int] = {}

    def set(self, key: str, frames: int) -> None:
        self.frames[key] = frames

    def snapshot(self) -> dict[str, int]:
        return dict(self.frames)


def progress_key(video_id: str, start: int) -> str:
    return f"{video_id}/{start}"



def source_identity(path: str) -> dict | None:
    """What tells a file from another one put at the same path: its size and modification time (None: unknown)."""
    from fkp_core.video import is_uri

    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            fs, where = pafs.FileSystem.from_uri(path)
            info = fs.get_file_info(where)
            return {"size": info.size, "mtime_ns": info.mtime_ns} if info.type == pafs.FileType.File else None
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except (OSError, ValueError):
        return None



def not_outputs(paths: list, out, render: str | None) -> list:
    """The inputs less fkp's own outputs (files under --out or --render): a re-run never annotates them."""
    roots = [Path(r) for r in ((out.root,) if out.is_local else ()) + ((render,) if render and "://" not in render else ())]
    keep = [p for p in paths if not (isinstance(p, Path) and any(r == p or r in p.parents for r in roots))]
    if len(keep) < len(paths):
        log.info("skipping %d file(s) under --out or --render (outputs of fkp are never inputs)", len(paths) - len(keep))
    return keep


def check_resources(args: argparse.Namespace, resources: dict | None) -> None:
    """Refuse segment tasks no node can ever run (they would wait forever): before Ray starts, against the CPUs a
    local instance gets; after, against the largest node (on a cluster an autoscaler may still add one)."""
    if resources is None:
        if os.environ.get("RAY_ADDRESS"):
            return
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda, but this machine has no GPU Ray can use")
        cpus, where = (args.num_cpus, f"the local Ray instance (--num-cpus {args.num_cpus})") if args.num_cpus else (os.cpu_count() or 1, "this machine")
    else:
        import ray

        cpus = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        where = "the largest node of the Ray cluster"
    if args.cpus_per_segment > cpus:
        message = (f"--cpus-per-segment {args.cpus_per_segment:g}: {where} has {cpus:g} CPU(s), so no segment task "
                   "could ever start")
        if resources is None or not os.environ.get("RAY_ADDRESS"):
            raise UsageError(message)
        log.warning("%s; waiting for the autoscaler to add a larger node", message)



def remove_if_empty(out, folder: str) -> None:
    import pyarrow.fs as pafs

    if out.exists(folder) and not out.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        out.remove_dir(folder)


# ------------------------------------------------------------------------------------------
# the work the driver hands its annotator actors, and what it does with what comes back
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """One call to an annotator: annotate a segment, finish a video, or render one.

    ``kind`` is also the name the call runs under (``ray::run_segment`` in ps, as segment tasks were)."""

    kind: str  # run_segment | finish | render
    plan: object  # fkp_core.records.VideoPlan
    segment: object = None  # fkp_core.records.Segment (run_segment)
    record: object = None  # fkp_core.records.VideoRecord (render)


@dataclass
class Done:
    """What an annotator call gave back: its value, or the last line of the error that stopped it."""

    work: Work
    value: object = None
    error: str | None = None


class RunState:
    """The driver's bookkeeping, Ray-free: which segments are still out, which videos are finished, and what
    to submit next when a call comes back. A failure of one input's call never stops the others."""

    def __init__(self, out, settings, plans: list, render: bool):
        from fkp_core.segments import failed_record

        self.out, self.settings, self.render = out, settings, render
        self.failed_record = failed_record
        self.records: dict = {}
        self.remaining = {p.video_id: len(p.segments) for p in plans}
        self.broken: dict[str, str] = {}  # video -> error of a segment call that raised (a bug, not bad data)
        self.frames_done = 0
        self.segments_done: set[str] = set()  # their progress keys: counted in frames_done, no longer in progress

    def fail(self, plan, reason: str) -> None:
        self.records[plan.video_id] = record = self.failed_record(plan, self.settings, reason)
        self.out.write_record(record)

    def on_done(self, done: Done) -> list[Work]:
        """Take a finished call in; -> the work it makes possible."""
        handler = {"run_segment": self._segment_done, "finish": self._finished, "render": self._rendered}[done.work.kind]
        return handler(done)

    def _segment_done(self, done: Done) -> list[Work]:
        plan = done.work.plan
        self.segments_done.add(progress_key(plan.video_id, done.work.segment.start))
        if done.error:
            self.broken.setdefault(plan.video_id, f"segment task failed: {done.error}")
        else:
            self.frames_done += done.value.frames
        self.remaining[plan.video_id] -= 1
        if self.remaining[plan.video_id]:
            return []
        if plan.video_id in self.broken:
            self.fail(plan, self.broken[plan.video_id])
            return []
        return [Work("finish", plan)]

    def _finished(self, done: Done) -> list[Work]:
        plan = done.work.plan
        if done.error:
            self.fail(plan, f"finalize task failed: {done.error}")
            return []
        self.records[plan.video_id] = done.value
        return [Work("render", plan, record=done.value)] if self.render and done.value.status != "failed" else []

    def _rendered(self, done: Done) -> list[Work]:
        record = done.work.record
        if done.error:
            self.records[record.video_id] = record = replace(record, error=f"render task failed: {done.error}")
            self.out.write_record(record)
            return []
        self.records[record.video_id] = done.value
        return []


class Annotator:
    """One segment slot of the cluster: holds the network (or the handle of a model actor that batches for a GPU)
    and the output folder, and does any Work it is handed. Errors come back as data, so the driver always
    knows whose they are; a killed annotator is restarted and its call retried by Ray."""

    def __init__(self, settings: Settings, model_actor=None):
        import ray

        from fkp_core.segments import remote_network
        from fkp_core.store import open_output

        self.settings = settings
        self.out = open_output(settings.out)
        self.network = None  # a local network is built on the first segment (see call)
        if model_actor is not None:
            self.network = remote_network(lambda crops: ray.get(model_actor.predict.remote(crops)), settings.model)

    def call(self, work: Work, progress=None, exported=None) -> Done:
        """Do one piece of work. ``exported``: the CNN the driver exported once (an ExportedNetwork, which Ray resolves
        from the driver's object ref), so this actor only builds an ONNX Runtime session, and imports no torch; it
        comes with each call, not to the constructor, so that a restarted actor never needs a constructor argument
        from the object store (ray-project/ray#53727). Without it the actor loads the model itself."""
        try:
            if self.network is None and work.kind == "run_segment":
                self.network = self._local_network(exported)
            return Done(work, getattr(self, work.kind)(work, progress))
        except Exception as exc:  # noqa: BLE001 - a bug with one input must not stop the others
            return Done(work, error=str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)

    def _local_network(self, exported):
        if exported is not None:
            from fkp_core.onnx_network import onnx_network

            return onnx_network(exported)
        from fkp_core.segments import load_network

        return load_network(self.settings.model, "cpu")

    def run_segment(self, work: Work, progress):
        from fkp_core.segments import annotate_segment

        plan, segment = work.plan, work.segment
        done = self.out.segment_done(plan.video_id, segment)
        if done is not None:
            return replace(done, skipped=True)
        key = progress_key(plan.video_id, segment.start)
        report = None if progress is None else (lambda n: progress.set.remote(key, n))
        result, cols = annotate_segment(self.network, plan.path, segment, plan.info.frame_size, self.settings, report,
                                        sequential=plan.info.vfr)
        self.out.write_segment(plan.video_id, plan.path, result, cols)
        return result

    def finish(self, work: Work, progress):
        from fkp_core.segments import finish_stored

        return finish_stored(self.out, work.plan, self.settings)

    def render(self, work: Work, progress):
        """The annotated copy, written where --render says: a local folder, or any filesystem URI (rendered into a
        local temporary folder, then copied in by the output folder's one atomic write)."""
        import tempfile

        from fkp_core.render import render_annotated
        from fkp_core.store import open_output

        record, where = work.record, self.settings.render
        rows = self.out.read_table(record.output)
        if "://" not in where:
            target = render_annotated(record.path, record.video_id, rows, where, self.settings.filters)
        else:
            with tempfile.TemporaryDirectory(prefix="fkp-render-") as tmp:
                local = render_annotated(record.path, record.video_id, rows, tmp, self.settings.filters)
                dest = open_output(where)
                dest.upload(local, dest.path(Path(local).name))
            target = f"{where.rstrip('/')}/{Path(local).name}"
        record = replace(record, render=target)
        self.out.write_record(record)
        return record


class ModelActor:
    """Holds the network (on a GPU when it has one), loaded once here, and batches the crops of the segments of
    all annotators (a GPU is fed batches across segments)."""

    def __init__(self, model: str, device: str, max_batch: int = 1024):
        from fkp_core.segments import load_network

        self.network = load_network(model, device)
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

    def _next_batch(self) -> list:
        batch, total = [], 0
        while self.pending and (not batch or total + len(self.pending[0][0]) <= self.max_batch):
            crops, fut = self.pending.popleft()
            batch.append((crops, fut))
            total += len(crops)
        return batch

    async def _drain(self) -> None:
        import numpy as np

        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)  # let requests that arrive together join one batch
            while self.pending:
                batch = self._next_batch()
                try:
                    out = await loop.run_in_executor(None, self.network.predict, np.concatenate([c for c, _ in batch]))
                except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                    for _, fut in batch:
                        fut.set_exception(exc)
                    continue
                self.batches += 1
                pos = 0
                for crops, fut in batch:
                    fut.set_result(out[pos : pos + len(crops)])
                    pos += len(crops)
                self.crops += pos
        finally:
            self.draining = False

    def stats(self) -> dict:
        return {"batches": self.batches, "crops": self.crops, "pid": os.getpid()}


def check_output(out, flag: str = "--out") -> None:
    """An object-store --out must take a write before any work starts."""
    probe_path = out.path(f"_write_test_{os.getpid()}")
    try:
        out.write_bytes(probe_path, b"ok")
        out.fs.delete_file(probe_path)
    except OSError as exc:
        raise UsageError(f"{flag} {out.uri}: not writable ({exc})") from None


# ------------------------------------------------------------------------------------------
# the driver's checks, resume selection and summary
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings(AnnotateSettings):
    """The library's settings plus where this run writes and where the CNN runs."""

    out: str = ""
    render: str | None = None
    filters: tuple[str, ...] = ()
    device: str = "cpu"  # cpu | cuda (model actors); annotators run the CNN on CPU unless model actors are used


def settings_from_args(args: argparse.Namespace) -> Settings:
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
        model=model_path, model_name=f"{Path(model_path).stem} ({loaded.metadata.get('sha256', '')[:12]})",
        detector=detector_spec(args), annotate=AnnotateConfig(detect_every=args.detect_every, refine=args.refine,
                                                                  mirror=not args.no_mirror, shifted_view=args.shifted_view,
                                                                  min_face_confidence=args.min_confidence),
        smooth=not args.no_smooth, segment_frames=args.segment_frames, sample_fps=args.sample_fps,
        out=args.out, render=args.render, filters=filters,
    )


def check_args(args: argparse.Namespace):
    """Usage checks that need no Ray, cheapest first, creating nothing: flags, model, inputs, output, render
    folder, resources; then the model's weights are loaded once. -> (paths, out, settings)."""
    from fkp_core.filters import parse_filters
    from fkp_core.store import open_output
    from fkp_core.video import find_media

    try:
        parse_filters(args.filter)
        out = open_output(args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_resources(args, None)
    check_model_arg(args.model, "--model")
    if args.render and "://" not in args.render:
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
    check_writable_dir(out.root, "--out") if out.is_local else check_output(out)
    if args.render:
        check_writable_dir(args.render, "--render") if "://" not in args.render else check_output(_render_output(args.render), "--render")
    return paths, out, settings_from_args(args)


def _render_output(uri: str):
    from fkp_core.store import open_output

    try:
        return open_output(uri)
    except ValueError as exc:
        raise UsageError(f"--render: {exc}") from None


def select(plans: list[VideoPlan], out, args: argparse.Namespace) -> tuple[dict, list, list[VideoPlan]]:
    """Split inputs into finished (their records), finished but missing a requested render, and to do."""
    from fkp_core.store import file_exists

    records, to_render, todo = {}, [], []
    for plan in plans:
        plan.source = source_identity(plan.path)
        done = None if args.overwrite else out.finished(plan)
        if done is None:
            if args.overwrite or plan.changed:
                out.forget(plan.video_id)
            if plan.changed:
                log.warning("%s: changed since it was finished in %s (size or modification time): annotating it again",
                            plan.path, out.uri)
            todo.append(plan)
        elif args.render and not (done.render and file_exists(done.render)):
            to_render.append(done)
        else:
            records[plan.video_id] = done
    if len(todo) < len(plans):
        log.info("%d of %d input(s) already finished in %s (use --overwrite to redo them)", len(plans) - len(todo), len(plans), out.uri)
    return records, to_render, todo


def plan_video_in(plan: VideoPlan, info: VideoProbe | dict, out, settings: Settings, slots: int) -> None:
    """Cut a video into segments; drop segments an earlier run wrote with other settings."""
    from fkp_core.segments import plan_video

    if isinstance(info, dict):
        info = VideoProbe(**{k: v for k, v in info.items() if k in VideoProbe.__dataclass_fields__})
    plan_video(plan, info, settings, slots)
    if not out.keep_plan(plan.video_id, settings.plan_key(plan.segments)):
        log.info("%s: discarding segments written with other settings", plan.path)


def _counts(records: list) -> dict[str, int]:
    for r in records:
        if r.status != "ok" or r.error:
            log.warning("%s: %s", r.status, r.error or r.path)
    return {s: sum(1 for r in records if r.status == s) for s in ("ok", "partial", "failed")}


def summary(args, out, mine: list, plans: list[VideoPlan], frames_done: int, elapsed: float) -> int:
    counts = _counts(mine)
    fps = frames_done / elapsed if elapsed > 0 else 0.0
    changed = sum(p.changed for p in plans)
    print(
        f"{len(mine)} input(s): {counts['ok']} ok, {counts['partial']} partial, {counts['failed']} failed; "
        f"{frames_done} frames annotated this run, {sum(r.faces or 0 for r in mine)} faces in total; "
        f"{elapsed:.1f} s ({fps:.1f} frames/s); tables in {out.uri}" + (f", videos in {args.render}" if args.render else "")
        + (f"; {changed} input(s) changed since they were finished here, so annotated again" if changed else "")
    )
    ok = counts["partial"] == 0 and counts["failed"] == 0 and not any(r.error for r in mine)
    return EXIT_OK if ok else EXIT_FAILED


class NetworkExport:
    """The CNN exported to ONNX on a thread of the driver, started before Ray so that it costs no wall time (Ray's
    start-up is longer); only where annotators will run the CNN themselves, as far as the flags tell before Ray."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        from fkp_core.onnx_network import export_network

        self.exported = None
        self.thread = None
        if args.device != "cuda" and not args.model_actors:
            self.thread = threading.Thread(target=lambda: setattr(self, "exported", export_network(settings.model)),
                                           name="fkp-export", daemon=True)
            self.thread.start()

    def ref(self, n_model: int):
        """-> an object ref of the ExportedNetwork for CPU annotators' calls (one copy per node), or None:
        model actors run the CNN, or the export is unavailable (each annotator then loads the model itself)."""
        import ray

        if self.thread is None or n_model:
            return None
        self.thread.join()
        return ray.put(self.exported) if self.exported is not None else None
