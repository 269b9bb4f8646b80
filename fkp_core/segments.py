"""Annotating a video, the library way: plan its segments, annotate one segment, finish the video.

A video is cut into segments of consecutive frames (deterministic boundaries, so a re-run finds
the same ones), each annotated on its own: decode, detect, crop, CNN, track, smooth, pose
(:func:`annotate_segment`). Finishing a video (:func:`finish_video`) stitches track ids across the
segment boundaries, smooths again only the rows next to a boundary, decides ok / partial / failed
and makes the video's record. Everything is typed (:mod:`fkp_core.records`); the output folder is
:mod:`fkp_core.store`'s. The Ray job runs these same functions on a pool of annotator actors;
:func:`annotate_video` runs them one after the other in this process::

    from fkp_core.segments import annotate_video
    rows, record = annotate_video("examples/sample.mp4")   # a FACE_SCHEMA table, a VideoRecord
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from fkp_core.fitted import ModelFit
from fkp_core.records import STAGES, Segment, SegmentResult, VideoPlan, VideoProbe, VideoRecord

if TYPE_CHECKING:  # imported where used: the job imports this module before any usage check (no torch, cv2, Arrow)
    import pyarrow as pa

    from fkp_core.annotator import AnnotateConfig, PredictFn
    from fkp_core.detector import DetectorSpec
    from fkp_core.tables import FaceColumns

MAX_SEGMENT_FRAMES = 1800  # the automatic segment size: a minute at 30 fps at most (what a retry redoes) ...
MIN_SEGMENT_FRAMES = 150  # ... and not so short that seeking and start-up dominate
PROGRESS_EVERY = 10  # frames between a segment's progress reports


def _default(what: str):
    if what == "detector":
        from fkp_core.detector import DetectorSpec

        return DetectorSpec()
    from fkp_core.annotator import AnnotateConfig

    return AnnotateConfig()


@dataclass(frozen=True)
class AnnotateSettings:
    """What decides a run's rows (the same for every segment of every video of a run)."""

    model: str  # path of the model file
    model_name: str = ""  # as the records name it: file stem and checksum
    detector: DetectorSpec = field(default_factory=lambda: _default("detector"))
    annotate: AnnotateConfig = field(default_factory=lambda: _default("annotate"))
    smooth: bool = True
    segment_frames: int | None = None  # None: auto_segment_frames
    sample_fps: float | None = None  # annotate only frames sampled at this rate (fkp_core.sampling)

    @staticmethod
    def for_model(model: str | None = None, **kwargs) -> AnnotateSettings:
        """Settings for a bundled model name or model file (None: the default model), the rest as given."""
        from pathlib import Path

        from fkp_core.weights import load_model, resolve_model_path

        path = str(resolve_model_path(model))
        checksum = load_model(path).metadata.get("sha256", "")[:12]
        return AnnotateSettings(model=path, model_name=f"{Path(path).stem} ({checksum})", **kwargs)

    def plan_key(self, segments: list[Segment]) -> dict:
        """What a video's work in progress was made with: segments written under another key are redone."""
        return {"segments": [[s.start, s.end] for s in segments], "model": self.model_name,
                "annotate": repr(self.annotate), "detector": repr(self.detector), "sample_fps": self.sample_fps}


# ------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------


def probe_video(path: str) -> VideoProbe | str:
    """Probe a video: what it holds, or the reason it is unusable (a bad input is data, never a crash)."""
    from fkp_core.video import VideoError, probe

    try:
        info = probe(path)
    except VideoError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any unreadable input is a failed item, not a crash
        return f"{path}: {type(exc).__name__}: {exc}"
    width, height = info.display_size  # frames are annotated as a player shows them (phones store portrait rotated)
    return VideoProbe(frames=int(info.frames), fps=float(info.fps), width=int(width), height=int(height),
                      exact=bool(getattr(info, "frames_exact", True)), vfr=bool(info.variable_rate), rotation=int(info.rotation))


def auto_segment_frames(frames: int, slots: int) -> int:
    """Segment length for one video: a multiple of ``slots`` equal segments of at most MAX_SEGMENT_FRAMES.

    Equal segments in whole rounds keep every worker busy to the end (5 segments on 2 CPUs would
    leave one idle for the last round).
    """
    slots = max(1, slots)
    count = -(-max(frames, 1) // MAX_SEGMENT_FRAMES)
    count = -(-count // slots) * slots
    return int(max(MIN_SEGMENT_FRAMES, -(-frames // count)))


def plan_segments(frames: int, segment_frames: int) -> list[Segment]:
    """Deterministic [start, end) ranges; the last is open-ended (None: to the end of the file).

    Frame counts from containers can be off (an estimate, or a last frame whose timestamp skips
    an index): the last segment decodes whatever the file holds after its start.
    """
    if frames <= 0:
        return [Segment(0, None)]
    segs = [Segment(s, min(s + segment_frames, frames)) for s in range(0, frames, segment_frames)]
    segs[-1] = Segment(segs[-1].start, None)
    return segs


def plan_video(plan: VideoPlan, info: VideoProbe, settings: AnnotateSettings, slots: int = 1) -> VideoPlan:
    """Cut a probed video into segments (``slots``: segments that run at once, for the automatic length)."""
    plan.info = info
    seg_len = settings.segment_frames or auto_segment_frames(info.frames, slots)
    # variable frame rate: frames are numbered in decoding order, which takes one decode from the start
    plan.segments = [Segment(0, None)] if info.vfr else plan_segments(info.frames, seg_len)
    return plan


# ------------------------------------------------------------------------------------------
# one segment
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """The landmark CNN as a segment uses it: crops in, keypoints out, and the crop geometry it was trained on."""

    predict: PredictFn
    size: int
    margin: float
    fit: ModelFit = ModelFit()  # fitted with this model (its JSON): face-confidence weights, mirrored-pass offset


def load_network(model: str, device: str = "cpu") -> Network:
    """Load the model once (an annotator's ``__init__``, or a Python user's script); one CPU thread for torch,
    since parallelism comes from running many segments."""
    import torch

    from fkp_core.detector import HAAR_CALIBRATION, Detections
    from fkp_core.landmarks import Landmarker

    class _NoDetector:  # segments detect themselves; the Landmarker only runs the network
        calibration = HAAR_CALIBRATION

        def detect(self, image):
            return Detections.empty()

    torch.set_num_threads(1)
    lm = Landmarker(model, detector=_NoDetector(), device=device)
    return Network(lm.predict_crops, lm.size, lm.margin, lm.fit)


def remote_network(predict: PredictFn, model: str) -> Network:
    """A network that runs elsewhere (a model actor): ``predict`` is the call, the geometry comes from the file."""
    from fkp_core.model import ModelConfig
    from fkp_core.weights import read_metadata

    meta = read_metadata(model)
    cfg = ModelConfig.from_dict(meta["config"])
    return Network(predict, cfg.input_size, cfg.crop_margin, ModelFit.from_metadata(meta))


def _sampled_frames(path: str, segment: Segment, settings: AnnotateSettings, decode, sequential: bool,
                    on_frame: Callable[[], None]):
    """The segment's frames to annotate. When sampling, the frame before the segment is decoded too: its
    timestamp decides whether the segment's first frame is sampled, as in one pass over the video."""
    from fkp_core.sampling import is_sampled, skip_until
    from fkp_core.video import read_frames

    first = segment.start - 1 if settings.sample_fps is not None and segment.start > 0 else segment.start
    previous_s = None  # timestamp of the frame decoded before this one (frame sampling)
    for f in read_frames(path, first, segment.end, gray=True, upright=True, on_error="skip",
                         stats=decode, threads=1, sequential=sequential, skip_until=skip_until(settings.sample_fps)):
        if f.index < segment.start:
            previous_s = f.timestamp_s
            continue
        on_frame()
        sampled = settings.sample_fps is None or is_sampled(f.timestamp_s, previous_s, settings.sample_fps)
        previous_s = f.timestamp_s
        if sampled:
            yield f


def annotate_segment(network: Network, path: str, segment: Segment, frame_size: tuple[int, int], settings: AnnotateSettings,
                     on_progress: Callable[[int], None] | None = None, sequential: bool = False) -> tuple[SegmentResult, FaceColumns]:
    """Annotate frames [start, end) of one video: rows smoothed and posed per track, and what the segment did.

    ``on_progress(frames taken so far)`` is called every PROGRESS_EVERY frames; ``sequential``: frames
    are numbered in decoding order (variable frame rate video, one segment from frame 0). Decoding
    trouble never raises: the rows decoded so far are kept and the result carries the error.
    """
    import cv2

    from fkp_core.annotator import SegmentAnnotator
    from fkp_core.detector import make_detector
    from fkp_core.postprocess import postprocess_segment
    from fkp_core.sampling import smoothing_for
    from fkp_core.video import DecodeStats, VideoError

    cv2.setNumThreads(1)
    annotator = SegmentAnnotator(network.predict, network.size, network.margin, make_detector(settings.detector), settings.annotate,
                                 network.fit)
    t0, cpu0 = time.perf_counter(), time.process_time()
    decode, taken = DecodeStats(), [0]

    def took() -> None:
        taken[0] += 1
        if on_progress is not None and taken[0] % PROGRESS_EVERY == 0:
            on_progress(taken[0])

    error = None
    try:
        gen = _sampled_frames(path, segment, settings, decode, sequential, took)
        first = next(gen, None)
        frames = [] if first is None else itertools.chain([first], gen)
        cols = annotator.run(frames)
    except VideoError as exc:
        error, cols = str(exc), annotator.result()
    except Exception as exc:  # noqa: BLE001 - decoder crashes on corrupt data: record, keep the frames we have
        error, cols = f"{path}: {type(exc).__name__}: {exc}", annotator.result()
    if error is None and decode.errors:
        end = segment.end if segment.end is not None else "end"
        error = f"{path}: {len(decode.errors)} decoding error(s) in frames [{segment.start}, {end}): {decode.errors[0]}"
    stats = annotator.stats
    t_post = time.perf_counter()
    cols = postprocess_segment(cols, frame_size, smooth=settings.smooth, smoothing=smoothing_for(settings.sample_fps))
    seconds = {**stats.seconds, "post": time.perf_counter() - t_post}
    result = SegmentResult(
        start=segment.start, end=segment.end, frames=stats.frames, decoded=taken[0] + decode.skipped, faces=stats.faces,
        detections=stats.detections, cuts=list(stats.cuts), head_signature=list(stats.head_signature),
        tail_signature=list(stats.tail_signature), seconds=seconds, seconds_total=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0, error=error,  # this process's CPU, all its threads
    )
    return result, cols


# ------------------------------------------------------------------------------------------
# finishing a video
# ------------------------------------------------------------------------------------------


def video_status(plan: VideoPlan, results: list[SegmentResult]) -> tuple[str, list[str]]:
    """ok / partial / failed and the reasons: failed when no frame decoded, partial on decoding errors or
    fewer frames than an exact count promised."""
    errors = [r.error for r in results if r.error]
    decoded = sum(r.decoded for r in results)
    expected = plan.info.frames if plan.info else 0
    truncated = expected > 0 and plan.info.exact and decoded < expected
    if decoded == 0:
        return "failed", errors or [f"{plan.path}: no frame could be decoded"]
    if truncated and not errors:
        return "partial", [f"{plan.path}: decoded {decoded} of {expected} frames (file truncated?)"]
    return ("partial" if errors or truncated else "ok"), errors


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def failed_record(plan: VideoPlan, settings: AnnotateSettings, reason: str) -> VideoRecord:
    info = plan.info
    return VideoRecord(
        video_id=plan.video_id, path=plan.path, status="failed", error=reason, frames_expected=info and info.frames,
        fps=info and info.fps, width=info and info.width, height=info and info.height, rotation=info and info.rotation,
        model=settings.model_name, finished_at=_now(), source=plan.source,
    )


@dataclass
class VideoTally:
    """What a finished video's rows add up to, counted as they stream past."""

    frames_with_faces: int = 0
    faces: int = 0
    tracks: set = field(default_factory=set)
    _last_frame: int = -1

    def add(self, cols: FaceColumns) -> None:
        """Rows in frame order, one piece after another."""
        frames = np.unique(cols.frame_index)
        self.frames_with_faces += int(len(frames)) - int(len(frames) > 0 and frames[0] == self._last_frame)
        self._last_frame = int(frames[-1]) if len(frames) else self._last_frame
        self.faces += len(cols)
        self.tracks.update(np.unique(cols.track_id).tolist())


def video_record(plan: VideoPlan, settings: AnnotateSettings, results: list[SegmentResult], tally: VideoTally,
                 output: str | None, cpu_seconds: float) -> VideoRecord:
    """The record of a video whose segments were all annotated (``cpu_seconds``: the finish's own)."""
    status, errors = video_status(plan, results)
    info = plan.info
    return VideoRecord(
        video_id=plan.video_id, path=plan.path, status=status, error="; ".join(errors) or None,
        frames_expected=info.frames, frames_decoded=sum(r.decoded for r in results),
        frames_annotated=sum(r.frames for r in results), sample_fps=settings.sample_fps, fps=info.fps,
        width=info.width, height=info.height, rotation=info.rotation, frames_with_faces=tally.frames_with_faces,
        faces=tally.faces, tracks=len(tally.tracks), segments=len(results),
        # CPU seconds of the segments and the finish (with model actors, not the actors' share of the CNN)
        seconds=float(sum(r.cpu_seconds or r.seconds_total for r in results) + cpu_seconds),
        output=output if status != "failed" else None, model=settings.model_name, finished_at=_now(), source=plan.source,
        stage_seconds={k: float(sum(r.seconds.get(k, 0.0) for r in results)) for k in STAGES},
    )


def finish_video(plan: VideoPlan, settings: AnnotateSettings, results: list[SegmentResult],
                 rows: list[FaceColumns]) -> tuple[VideoRecord, FaceColumns]:
    """Stitch a video's segments (all in memory) -> its record (``output`` unset) and its rows in frame order."""
    from fkp_core.postprocess import postprocess_video
    from fkp_core.sampling import smoothing_for

    cpu0 = time.process_time()
    merged = postprocess_video(rows, results, plan.info.frame_size, smooth=settings.smooth,
                               smoothing=smoothing_for(settings.sample_fps))
    tally = VideoTally()
    tally.add(merged)
    return video_record(plan, settings, results, tally, None, time.process_time() - cpu0), merged


def finish_stored(out, plan: VideoPlan, settings: AnnotateSettings) -> VideoRecord:
    """Finish a video whose segments are written in ``out`` (a :class:`~fkp_core.store.Output`): its part file
    streamed segment by segment (peak memory one segment's rows, whatever the video's length), its status
    record; its segment files are then removed."""
    from fkp_core.postprocess import stitch_stream
    from fkp_core.sampling import smoothing_for
    from fkp_core.tables import FACE_SCHEMA, faces_table

    cpu0 = time.process_time()
    results = [out.segment_result(plan.video_id, s) for s in plan.segments]
    tally = VideoTally()
    status, _ = video_status(plan, results)
    part = out.part_path(plan.video_id)
    if status != "failed":
        def load(k: int) -> FaceColumns:
            return out.read_segment(plan.video_id, plan.segments[k])[1]

        with out.table_writer(part, FACE_SCHEMA) as writer:
            for cols in stitch_stream(load, results, plan.info.frame_size, smooth=settings.smooth,
                                      smoothing=smoothing_for(settings.sample_fps)):
                tally.add(cols)
                writer.write_table(faces_table(plan.video_id, plan.path, cols))
    record = video_record(plan, settings, results, tally, part, time.process_time() - cpu0)
    out.write_record(record)
    out.remove_dir(out.segment_dir(plan.video_id))
    return record


# ------------------------------------------------------------------------------------------
# a whole video in this process (no Ray)
# ------------------------------------------------------------------------------------------


def annotate_video(path: str, model: str | None = None, network: Network | None = None,
                   settings: AnnotateSettings | None = None, video_id: str | None = None) -> tuple[pa.Table, VideoRecord]:
    """Annotate one video file here, segment after segment: its rows (FACE_SCHEMA) and its record.

    The rows are those ``python -m jobs.annotate`` writes with the same settings and segments
    (``settings.segment_frames``; by default the segments of a one-CPU run).
    """
    from fkp_core.tables import FaceColumns, faces_table
    from fkp_core.video import video_id as make_id

    settings = settings or AnnotateSettings.for_model(model)
    plan = VideoPlan(str(path), video_id or make_id(path))
    info = probe_video(plan.path)
    if isinstance(info, str):
        return faces_table(plan.video_id, plan.path, FaceColumns.empty()), failed_record(plan, settings, info)
    plan_video(plan, info, settings)
    network = network or load_network(settings.model)
    done = [annotate_segment(network, plan.path, s, info.frame_size, settings, sequential=info.vfr) for s in plan.segments]
    record, rows = finish_video(plan, settings, [r for r, _ in done], [c for _, c in done])
    return faces_table(plan.video_id, plan.path, rows), record

