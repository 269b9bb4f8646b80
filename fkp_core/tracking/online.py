"""The online tracker: inside a segment, each face of each frame gets a local track id, frame by frame."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fkp_core.constants import NUM_KEYPOINTS
from fkp_core.tracking.matching import TrackerConfig, _match, _shift_box, _velocity, match_cost


@dataclass
class _Track:
    track_id: int
    box: np.ndarray  # (4,) last matched box
    frames: deque  # last observation frames, oldest first
    keypoints: deque  # last observed (68, 2) keypoints, float64
    detector_score: float = float("nan")  # the score of the face's last detection
    misses: int = 0  # detection frames in a row on which the detector did not see the face

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    def predict(self, frame_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(box, keypoints) expected at ``frame_index`` under constant velocity."""
        last = self.keypoints[-1]
        kp = last + _velocity(self.frames, self.keypoints) * (frame_index - self.last_frame)
        return _shift_box(self.box, last, kp), kp


@dataclass(frozen=True)
class FollowedFaces:
    """The faces of the last frame the tracker was given, in the order given: what the video fast
    path crops around and predicts again on the next frame."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, NUM_KEYPOINTS, 2), np.float32))
    detector_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    misses: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


class Tracker:
    """Give each face of each frame a track id (int64, allocated 0, 1, 2, ... in order of creation).

    Feed frames in increasing order. A track unmatched for more than ``max_gap`` frames ends; a
    face that matches no live track starts a new one. Call :meth:`reset` on a scene cut: every
    track ends and the faces after the cut get new ids (ids are never reused).
    """

    def __init__(self, config: TrackerConfig | None = None, first_id: int = 0):
        self.config = config or TrackerConfig()
        self._next_id = int(first_id)
        self._tracks: list[_Track] = []
        self._last_frame: int | None = None
        self._followed: list[_Track] = []  # the tracks of the last frame's faces, in the order given

    def _live(self, frame_index: int) -> list[_Track]:
        return [t for t in self._tracks if frame_index - t.last_frame - 1 <= self.config.max_gap]

    def update(
        self, frame_index: int, boxes: np.ndarray, keypoints: np.ndarray, continues: np.ndarray | None = None,
        detector_scores: np.ndarray | None = None, misses: np.ndarray | None = None,
    ) -> np.ndarray:
        """Track ids (N,) int64 of the N faces (boxes (N, 4) xywh, keypoints (N, 68, 2)) of frame ``frame_index``.

        ``continues`` (N,) optionally names the track each face is known to continue (-1: unknown),
        as the video fast path knows for a face it followed from its own previous keypoints: such a
        face keeps that id while the track is live, and only the others are matched.
        ``detector_scores`` and ``misses`` (N,), when given, are kept with each face's track for
        :meth:`followed` (NaN and 0 otherwise).
        """
        frame_index = int(frame_index)
        boxes, kp = self._check(frame_index, boxes, keypoints)
        self._tracks = self._live(frame_index)
        ids = np.full(len(kp), -1, np.int64)
        free = self._continue_known(frame_index, boxes, kp, continues, ids) if continues is not None else list(self._tracks)
        todo = np.flatnonzero(ids < 0)
        if free and len(todo):
            self._match_free(frame_index, free, todo, boxes, kp, ids)
        for di in np.nonzero(ids < 0)[0]:
            ids[di] = self._start(frame_index, boxes[di], kp[di])
        self._remember(ids, detector_scores, misses)
        return ids

    def _remember(self, ids: np.ndarray, detector_scores: np.ndarray | None, misses: np.ndarray | None) -> None:
        by_id = {t.track_id: t for t in self._tracks}
        self._followed = [by_id[int(i)] for i in ids]
        scores = np.full(len(ids), np.nan) if detector_scores is None else np.asarray(detector_scores, np.float64).reshape(len(ids))
        missed = np.zeros(len(ids), int) if misses is None else np.asarray(misses, int).reshape(len(ids))
        for track, score, miss in zip(self._followed, scores.tolist(), missed.tolist()):
            track.detector_score, track.misses = score, miss

    def followed(self) -> FollowedFaces:
        """The faces of the last frame (none after :meth:`reset`), with their ids, keypoints, last detector scores and misses."""
        if not self._followed:
            return FollowedFaces()
        tracks = self._followed
        return FollowedFaces(
            ids=np.array([t.track_id for t in tracks], np.int64),
            keypoints=np.stack([t.keypoints[-1] for t in tracks]).astype(np.float32),
            detector_scores=np.array([t.detector_score for t in tracks], np.float64),
            misses=np.array([t.misses for t in tracks], int),
        )

    def _check(self, frame_index: int, boxes: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._last_frame is not None and frame_index <= self._last_frame:
            raise ValueError(f"frames must increase: got {frame_index} after {self._last_frame}")
        self._last_frame = frame_index
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        kp = np.asarray(keypoints, np.float64).reshape(-1, NUM_KEYPOINTS, 2)
        if len(boxes) != len(kp):
            raise ValueError(f"{len(boxes)} boxes but {len(kp)} keypoint sets")
        return boxes, kp

    def _continue_known(self, frame_index: int, boxes: np.ndarray, kp: np.ndarray, continues, ids: np.ndarray) -> list[_Track]:
        """Faces known to continue a live track keep its id (``ids`` filled in); -> the tracks left to match."""
        continues = np.asarray(continues, np.int64).reshape(-1)
        if len(continues) != len(kp):
            raise ValueError(f"{len(kp)} faces but {len(continues)} continued track ids")
        by_id = {t.track_id: t for t in self._tracks}
        for di, tid in enumerate(continues.tolist()):
            track = by_id.pop(tid, None)  # each live track continues into one face at most
            if track is not None:
                self._extend(track, frame_index, boxes[di], kp[di])
                ids[di] = tid
        return [t for t in self._tracks if t.track_id in by_id]

    def _match_free(self, frame_index: int, free: list[_Track], todo: np.ndarray, boxes: np.ndarray, kp: np.ndarray,
                    ids: np.ndarray) -> None:
        """The optimal matching of the faces ``todo`` to the ``free`` tracks' predictions (``ids`` filled in)."""
        preds = [t.predict(frame_index) for t in free]
        missed = np.array([frame_index - t.last_frame - 1 for t in free])
        cost, feasible = match_cost(
            np.stack([b for b, _ in preds]), np.stack([k for _, k in preds]), boxes[todo], kp[todo], missed, self.config
        )
        for ti, dj in _match(cost, feasible):
            di = todo[dj]
            self._extend(free[ti], frame_index, boxes[di], kp[di])
            ids[di] = free[ti].track_id

    def _start(self, frame_index: int, box: np.ndarray, kp: np.ndarray) -> int:
        """A new track for a face no live track continues; -> its id."""
        window = self.config.velocity_window + 1
        frames, points = deque([frame_index], maxlen=window), deque([kp.copy()], maxlen=window)
        track = _Track(self._next_id, box.copy(), frames, points)
        self._next_id += 1
        self._tracks.append(track)
        return track.track_id

    @staticmethod
    def _extend(track: _Track, frame_index: int, box: np.ndarray, keypoints: np.ndarray) -> None:
        track.box = box.copy()
        track.frames.append(frame_index)
        track.keypoints.append(keypoints.copy())

    def reset(self) -> None:
        """End every track (call on a scene cut); later faces get new ids."""
        self._tracks = []
        self._followed = []

    @property
    def next_id(self) -> int:
        """The id the next new track will get (= the number of ids allocated when ``first_id`` is 0)."""
        return self._next_id
