"""The typed values of the annotate data flow: a video's probe, its plan, a segment's result, a video's record.

They travel as they are (dataclasses) from where they are made to where they are written; their
Parquet and JSON forms are made in one place, :mod:`fkp_core.tables`. Plain data only: no I/O here,
so every module of the flow (segments, store, tables) can import this one without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("decode", "detect", "cnn", "other", "post")  # where a segment's CPU time goes (benchmarks, the report)


@dataclass(frozen=True)
class VideoProbe:
    """What probing a video told: its frames as a player shows them (size after rotation)."""

    frames: int
    fps: float
    width: int
    height: int
    exact: bool = True  # the frame count is exact (not a container's estimate)
    vfr: bool = False  # variable frame rate: frames are numbered in decoding order, one segment from frame 0
    rotation: int = 0

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class Segment:
    """Frames [start, end) of one video; ``end`` None: to the end of the file (a container's count can be off)."""

    start: int
    end: int | None


@dataclass
class VideoPlan:
    """One input: where it is, what probing found, the segments it is cut into."""

    path: str
    video_id: str
    info: VideoProbe | None = None
    error: str | None = None  # why it cannot be annotated (probe failed)
    segments: list[Segment] = field(default_factory=list)
    source: dict | None = None  # the input file's size and modification time (a replaced file is redone)
    changed: bool = False  # finished in OUT before, but the file at its path has changed since


@dataclass
class SegmentResult:
    """What annotating one segment did (its rows travel beside it as FaceColumns, or in its segment file)."""

    start: int
    end: int | None
    frames: int = 0  # frames annotated (the sampled ones with --sample-fps)
    decoded: int = 0  # frames decoded in the segment
    faces: int = 0
    detections: int = 0  # frames on which the detector ran
    cuts: list[int] = field(default_factory=list)  # frames that start a new shot
    head_signature: list[float] = field(default_factory=list)  # frame signatures of the first and last frame:
    tail_signature: list[float] = field(default_factory=list)  # a cut exactly at a boundary is found from them
    seconds: dict[str, float] = field(default_factory=dict)  # CPU time per stage (STAGES)
    seconds_total: float = 0.0  # wall time of the segment
    cpu_seconds: float = 0.0  # CPU time of the process that annotated it
    error: str | None = None  # decoding trouble: the video becomes partial
    skipped: bool = False  # an earlier run wrote it; nothing was annotated now


@dataclass
class VideoRecord:
    """The per-video status record: one row of ``_videos.parquet`` and one ``_status/<video_id>.json``."""

    video_id: str
    path: str
    status: str  # ok | partial | failed
    error: str | None = None
    frames_expected: int | None = None
    frames_decoded: int = 0
    frames_annotated: int | None = None
    sample_fps: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    rotation: int | None = None
    frames_with_faces: int = 0
    faces: int = 0
    tracks: int = 0
    segments: int = 0
    seconds: float = 0.0  # CPU seconds of the segments and the finish
    output: str | None = None
    render: str | None = None
    model: str | None = None
    finished_at: str | None = None
    source: dict | None = None
    stage_seconds: dict[str, float] | None = None

    @property
    def done(self) -> bool:
        """Finished with rows to keep (ok or partial)."""
        return self.status in ("ok", "partial") and bool(self.output)
