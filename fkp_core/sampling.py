"""Frame sampling: annotate a steady subset of a video's frames (``jobs.annotate --sample-fps``).

A frame is sampled when it is the first frame at or after an instant k / rate (k = 0, 1, ...) of
its presentation time, so the choice depends only on the frame's timestamp and its predecessor's:
the same frames are chosen whether a video is annotated in one piece or in segments, and variable
frame rates keep a steady rate in time. Sampled frames keep their true frame index and timestamp;
tracking and smoothing run over them with their real time steps.

Decoding follows the sampled frames where the codec allows: :func:`skip_until` tells
``fkp_core.video.read_frames`` when the next sampled frame can come at the earliest, and the reader
seeks over the frames before it when a keyframe lies between (decoding the frames from that keyframe
on), so that sparse sampling of video with short keyframe intervals decodes a fraction of the frames.
The sampled frames are exactly those of a full decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from fkp_core.smoothing import OneEuroConfig

EPS = 1e-6  # timestamps are rounded to their time base: an instant hit exactly counts as reached


class Timed(Protocol):
    timestamp_s: float


def is_sampled(timestamp_s: float, previous_s: float | None, rate: float) -> bool:
    """Whether a frame at ``timestamp_s``, after one at ``previous_s`` (None: the first frame), is sampled at ``rate`` per second."""
    if previous_s is None:
        return True
    return math.floor(timestamp_s * rate + EPS) > math.floor(previous_s * rate + EPS)


def sample_frames(frames: Iterable[Timed], rate: float | None, previous_s: float | None = None) -> Iterator[Timed]:
    """The sampled frames of a run of consecutive decoded frames; ``previous_s``: the timestamp of the frame before them."""
    for frame in frames:
        if rate is None or is_sampled(frame.timestamp_s, previous_s, rate):
            yield frame
        previous_s = frame.timestamp_s


def skip_until(rate: float | None) -> Callable[[float], float] | None:
    """``read_frames(skip_until=...)`` for sampling at ``rate`` (None: every frame, no skipping): after a frame at
    ``t`` s, the earliest time the next sampled frame can have (the next instant k / rate, less the rounding
    allowance of :func:`is_sampled`)."""
    if rate is None:
        return None

    def until(timestamp_s: float) -> float:
        return (math.floor(timestamp_s * rate + EPS) + 1 - EPS) / rate

    return until


def smoothing_for(rate: float | None, config: OneEuroConfig | None = None) -> OneEuroConfig:
    """Smoothing settings for frames sampled at ``rate``: one sampling step is not a gap that restarts the filter."""
    cfg = config or OneEuroConfig()
    if rate is None:
        return cfg
    return replace(cfg, max_gap_s=max(cfg.max_gap_s, 1.5 / rate))
