"""Consecutive frames of one segment -> per-face rows: detect, crop, predict, track.

The library half of the annotate job, with no Ray in it: the job hands an iterator of decoded
frames and a ``predict_crops`` callable (a local network, or a call to a model actor that
batches crops from many segments on a GPU) and gets back the segment's rows.

Two ways through the frames:

* frame by frame (the default): Haar every ``detect_every`` frames (every frame when K = 1); on
  the others each tracked face is cropped around its previous keypoints (the framing the model
  was trained on) and predicted again. A face whose fit is lost (face confidence below
  ``min_confidence``) triggers a detection on that very frame; a tracked face the detector
  misses on a detection frame is kept while its fit holds (Haar drops faces for single frames).
  After a face is lost, and on the first frame of a new shot (or of the segment), the detector runs on every frame
  until it finds a face, for up to K frames, so a face Haar misses for a frame or two is not
  left out for a whole detection interval.
* in chunks (``chunk_frames > 1`` with K = 1, used with model actors): Haar on every frame and
  all the faces of ``chunk_frames`` frames through the network in one batch (then once more,
  re-cropped around the first prediction, when ``refine`` is on): one round trip per chunk
  rather than per frame. Faces the detector misses are missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fkp_core.confidence import face_confidence
from fkp_core.constants import (
    MIN_FACE_CONFIDENCE,
    NUM_KEYPOINTS,
    REDETECT_CONFIDENCE,
    SHIFTED_VIEW_PIXELS,
)
from fkp_core.detector import FaceDetector, iou
from fkp_core.fitted import ModelFit
from fkp_core.landmarks import refined_keypoints
from fkp_core.tables import FaceColumns
from fkp_core.tracking import (
    REDETECT_BELOW,
    SCENE_CUT_THRESHOLD,
    Tracker,
    TrackerConfig,
    cut_score,
    frame_signature,
    keypoint_consistency,
)
from fkp_core.transforms import box_from_keypoints, face_frame, to_gray

PredictFn = Callable[[np.ndarray], np.ndarray]  # (N, S, S) uint8 crops -> (N, 68, 2) in [-1, 1], or (N, 68, 3) with point scores


@dataclass(frozen=True)
class AnnotateConfig:
    """How a segment is annotated (shared by every segment of a run)."""

    detect_every: int = 1
    refine: int = 1  # extra CNN passes re-cropped around the prediction, on detection frames
    # each face's last crop also predicted on its mirror image, averaged (fkp_core.mirror), where the model has an offset
    mirror: bool = True
    # and shifted half a heatmap cell, averaged too (fkp_core.shifted_view): one more CNN pass per face, two with the mirror
    shifted_view: bool = False
    chunk_frames: int = 1  # > 1 with detect_every 1: batch the CNN over this many frames (model actors)
    min_confidence: float = REDETECT_CONFIDENCE  # fast path: below this face confidence a tracked face is re-detected at once
    # faces below this confidence (fkp_core.confidence.face_confidence) are dropped, never written nor tracked; 0 keeps all
    min_face_confidence: float = MIN_FACE_CONFIDENCE
    # a tracked face the detector has not seen for this many frames (and at least 2 detection frames) is dropped
    max_unconfirmed_frames: int = 10
    upright: bool = True  # crops turned so the eyes are level (detector eye points, then the keypoints)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


@dataclass
class SegmentStats:
    """What a segment did, for the per-video table and the benchmark."""

    frames: int = 0
    faces: int = 0
    detections: int = 0  # frames on which the detector ran
    cuts: list[int] = field(default_factory=list)  # frames that start a new shot (tracks were reset before them)
    head_signature: list[float] = field(default_factory=list)  # tracking.frame_signature of the first frame ...
    tail_signature: list[float] = field(default_factory=list)  # ... and of the last: cuts at segment boundaries
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "detect": 0.0, "cnn": 0.0, "other": 0.0})

    def to_dict(self) -> dict:
        return {"frames": self.frames, "faces": self.faces, "detections": self.detections, "cuts": list(self.cuts),
                "head_signature": list(self.head_signature), "tail_signature": list(self.tail_signature),
                "seconds": dict(self.seconds)}


@dataclass
class _Frame:
    index: int
    timestamp: float
    gray: np.ndarray
    cut: bool = False  # first frame of a new shot


class SegmentAnnotator:
    """Annotates one segment's frames in order; keeps the segment's track state."""

    def __init__(self, predict_crops: PredictFn, input_size: int, margin: float, detector: FaceDetector, config: AnnotateConfig,
                 fit: ModelFit = ModelFit()):
        if config.detect_every < 1:
            raise ValueError("detect_every must be >= 1")
        self.predict_crops = predict_crops
        self.size = input_size
        self.margin = margin
        self.detector = detector
        self.config = config
        self.fit = fit.mirrored(config.mirror)  # the model's: face-confidence weights, mirrored-pass offset
        self.tracker = Tracker(config.tracker)
        self.stats = SegmentStats()
        self._parts: list[FaceColumns] = []
        self._prev_signature: np.ndarray | None = None

    # ---- public ----

    def run(self, frames: Iterable) -> FaceColumns:
        """Annotate every frame (objects with ``index``, ``timestamp_s``, ``image``); returns the rows.

        The segment's first frame starts a shot. A cut at a segment boundary is found when segments
        are stitched, from the signatures of the frames on either side (``stats.head_signature``,
        ``stats.tail_signature``), as is every other cut between segments.
        """
        it = self._timed_frames(frames)
        if self.config.detect_every == 1 and self.config.chunk_frames > 1:
            self._run_detect_every_frame(it)
        else:
            self._run_fast_path(it)
        return self.result()

    def result(self) -> FaceColumns:
        """The rows so far (all of them after run(); those before the failure when decoding broke off)."""
        return FaceColumns.concat(self._parts)

    # ---- internals ----

    def _timed_frames(self, frames: Iterable) -> Iterator[_Frame]:
        iterator = iter(frames)
        signature = None
        while True:
            t0 = time.perf_counter()
            try:
                f = next(iterator)
            except StopIteration:
                break
            gray = to_gray(np.asarray(f.image))
            t1 = time.perf_counter()
            self.stats.seconds["decode"] += t1 - t0
            self.stats.frames += 1
            signature = frame_signature(gray)
            if not self.stats.head_signature:
                self.stats.head_signature = signature.tolist()
            cut = self._prev_signature is not None and cut_score(self._prev_signature, signature) > SCENE_CUT_THRESHOLD
            if cut:  # the tracker is reset when this frame's faces are emitted (chunks run ahead)
                self.stats.cuts.append(int(f.index))
            self._prev_signature = signature
            self.stats.seconds["other"] += time.perf_counter() - t1
            yield _Frame(int(f.index), float(f.timestamp_s), gray, cut)
        if signature is not None:
            self.stats.tail_signature = signature.tolist()

    def _detect(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The crop boxes (N, 4), angles (N,) and detector scores (N,) of the faces the detector finds, through its calibration."""
        t0 = time.perf_counter()
        detections = self.detector.detect(gray)
        boxes, angles = self.detector.calibration.crop_regions(detections, self.config.upright)
        self.stats.seconds["detect"] += time.perf_counter() - t0
        self.stats.detections += 1
        scores = detections.scores if getattr(self.detector, "scored", True) else np.full(len(boxes), np.nan)
        return boxes, angles, np.asarray(scores, np.float64).reshape(len(boxes))

    def _predict(self, grays: list[np.ndarray], boxes: list[np.ndarray], angles: list[np.ndarray] | None = None,
                 refine: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Keypoints (Ni, 68, 2) in frame pixels for the boxes of each frame, their scores (Ni, 68) and the
        crop boxes of the last of ``1 + refine`` passes (each pass one network call for all frames)."""
        cnn = 0.0

        def timed(crops: np.ndarray) -> np.ndarray:
            nonlocal cnn
            t = time.perf_counter()
            out = np.asarray(self.predict_crops(crops))
            cnn += time.perf_counter() - t
            return out

        t0 = time.perf_counter()
        result = refined_keypoints(timed, grays, boxes, self.size, self.margin, angles, refine, self.config.upright,
                                   self.fit.mirror_offset, SHIFTED_VIEW_PIXELS if self.config.shifted_view else 0)
        self.stats.seconds["cnn"] += cnn
        self.stats.seconds["other"] += time.perf_counter() - t0 - cnn
        return result

    def _predict_refined(
        self, grays: list[np.ndarray], boxes: list[np.ndarray], angles: list[np.ndarray], det_scores: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Keypoints after ``refine`` re-crops, the face confidence of each (detector score, point scores
        and consistency of the last pass with its crop), and the point scores."""
        kps, scores, crop_boxes = self._predict(grays, boxes, angles, self.config.refine)
        conf = [face_confidence(d, sc, self._consistency(b, k), self.fit.face_weights) for b, k, sc, d in zip(crop_boxes, kps, scores, det_scores)]
        return kps, conf, scores

    def _frame(self, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes and angles around (N, 68, 2) keypoints: the framing the model was trained on."""
        return face_frame(kps, self.config.upright)

    def _consistency(self, crop_boxes: np.ndarray, kps: np.ndarray) -> np.ndarray:
        up = self.config.upright
        return np.array([keypoint_consistency(b, k, upright=up) for b, k in zip(crop_boxes, kps)], np.float32).reshape(len(kps))

    def _emit(self, frame: _Frame, boxes: np.ndarray, kps: np.ndarray, detected: np.ndarray, confidence: np.ndarray,
              continues: np.ndarray | None = None, scores: np.ndarray | None = None,
              detector_scores: np.ndarray | None = None, misses: np.ndarray | None = None) -> np.ndarray:
        """Record a frame's faces and hand them to the tracker; returns their track ids (in the order given)."""
        n = len(kps)
        scores = np.full((n, NUM_KEYPOINTS), np.nan, np.float32) if scores is None else np.asarray(scores, np.float32)
        if frame.cut:
            self.tracker.reset()
        ids = self.tracker.update(frame.index, boxes, kps, continues, detector_scores, misses)
        if n == 0:
            return ids
        order = np.argsort(boxes[:, 0], kind="stable")  # face_index: left to right
        self.stats.faces += n
        self._parts.append(
            FaceColumns(
                frame_index=np.full(n, frame.index, np.int64),
                timestamp_s=np.full(n, frame.timestamp, np.float64),
                face_index=np.arange(n, dtype=np.int32),
                track_id=np.asarray(ids, np.int64)[order],
                boxes=np.round(boxes[order]).astype(np.int32),
                detected=np.asarray(detected, bool)[order],
                confidence=np.asarray(confidence, np.float32)[order],
                keypoints=kps[order],
                keypoints_raw=kps[order],
                pose=np.zeros((n, 3), np.float32),
                keypoint_scores=scores[order],
            )
        )
        return ids

    def _run_detect_every_frame(self, frames: Iterator[_Frame]) -> None:
        chunk: list[_Frame] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) >= self.config.chunk_frames:
                self._flush_chunk(chunk)
                chunk = []
        if chunk:
            self._flush_chunk(chunk)

    def _flush_chunk(self, chunk: list[_Frame]) -> None:
        grays = [f.gray for f in chunk]
        regions = [self._detect(g) for g in grays]
        boxes = [r[0] for r in regions]
        kps, conf, scores = self._predict_refined(grays, boxes, [r[1] for r in regions], [r[2] for r in regions])
        for f, b, k, c, sc in zip(chunk, boxes, kps, conf, scores):
            keep = c >= self.config.min_face_confidence
            self._emit(f, b[keep], k[keep], np.ones(int(keep.sum()), bool), c[keep], scores=sc[keep])

    def _run_fast_path(self, frames: Iterator[_Frame]) -> None:
        K = self.config.detect_every
        thr = self.config.min_confidence
        max_misses = max(2, -(-self.config.max_unconfirmed_frames // K))
        since = K  # frames since the last detection; K forces one on the first frame
        search = K  # frames left in which to detect on every frame: a shot (or the segment) began, or a face was just lost
        for frame in frames:
            if frame.cut:  # a new shot: nothing carries over, look again (and keep looking for K frames)
                self.tracker.reset()
                since, search = K, K
            # every face of the last frame (the tracker's): crop around its keypoints, predict again
            followed = self.tracker.followed()
            prev, prev_ids, prev_det, misses = followed.keypoints, followed.ids, followed.detector_scores, followed.misses
            t_boxes, t_angles = self._frame(prev) if len(prev) else (np.zeros((0, 4)), np.zeros(0))
            if len(prev):
                t_kps, t_scores = (x[0] for x in self._predict([frame.gray], [t_boxes], [t_angles])[:2])
            else:
                t_kps, t_scores = prev, np.zeros((0, NUM_KEYPOINTS), np.float32)
            t_fit = self._consistency(t_boxes, t_kps)
            t_conf = face_confidence(prev_det, t_scores, t_fit, self.fit.face_weights)
            keep = _dedupe(t_kps, t_conf)
            t_kps, t_boxes, t_conf, t_misses, t_ids = t_kps[keep], t_boxes[keep], t_conf[keep], misses[keep], prev_ids[keep]
            t_scores, t_fit, t_det = t_scores[keep], t_fit[keep], prev_det[keep]
            ok = (t_conf >= thr) & (t_fit >= REDETECT_BELOW)  # a confident face whose fit still sits in its crop
            if since >= K or not ok.all() or search > 0:
                since = 1
                boxes, angles, d_scores = self._detect(frame.gray)
                matched = np.zeros(len(t_kps), bool)
                new = np.ones(len(boxes), bool)
                if len(boxes) and ok.any():
                    overlap = (iou(boxes, box_from_keypoints(t_kps)) > 0.3) & ok[None, :]
                    new = ~overlap.any(axis=1)
                    matched = overlap.any(axis=0)
                    # a tracked face the detector sees again takes its new score
                    seen = np.where(overlap, d_scores[:, None], -np.inf).max(axis=0)
                    t_det = np.where(matched, seen, t_det)
                # a tracked face the detector missed stays while its fit holds, but only for a few
                # detection frames: the fit cannot tell a face from a patch that merely looks stable
                t_misses = np.where(matched, 0, t_misses + 1)
                t_conf = face_confidence(t_det, t_scores, t_fit, self.fit.face_weights)
                stay = ok & (t_misses <= max_misses)
                d_kps, d_conf, d_kscores = self._predict_refined([frame.gray], [boxes[new]], [angles[new]], [d_scores[new]])
                out_kps = np.concatenate([t_kps[stay], d_kps[0]]).astype(np.float32)
                out_boxes = np.concatenate([t_boxes[stay], boxes[new]])
                detected = np.concatenate([matched[stay], np.ones(int(new.sum()), bool)])
                out_conf = np.concatenate([t_conf[stay], d_conf[0]])
                out_scores = np.concatenate([t_scores[stay], d_kscores[0]])
                out_det = np.concatenate([t_det[stay], d_scores[new]])
                out_misses = np.concatenate([t_misses[stay], np.zeros(int(new.sum()), int)])
                continues = np.concatenate([t_ids[stay], np.full(int(new.sum()), -1, np.int64)])
                # Haar often misses a face for a frame or two: after losing one, look on every frame
                # for up to K frames rather than leaving the face out until the next scheduled look
                if new.any():
                    search = 0
                elif not stay.all():
                    search = K - 1
                else:
                    search = max(0, search - 1)
            else:
                since += 1
                out_kps, out_boxes, detected, out_conf, out_misses = t_kps, t_boxes, np.zeros(len(t_kps), bool), t_conf, t_misses
                out_scores, out_det, continues = t_scores, t_det, t_ids
            # faces too unlikely to be faces are neither written nor followed
            sure = out_conf >= self.config.min_face_confidence
            self._emit(frame, out_boxes[sure], out_kps[sure], detected[sure], out_conf[sure], continues[sure], out_scores[sure],
                       out_det[sure], out_misses[sure])


def _dedupe(kps: np.ndarray, conf: np.ndarray, max_iou: float = 0.5) -> np.ndarray:
    """Indices of the tracks to keep when two converged on one face (the more confident stays), in order."""
    if len(kps) < 2:
        return np.arange(len(kps))
    order = np.argsort(-conf, kind="stable")
    fitted = box_from_keypoints(kps)
    keep: list[int] = []
    for i in order:
        if not keep or iou(fitted[i : i + 1], fitted[keep]).max() <= max_iou:
            keep.append(int(i))
    return np.array(sorted(keep), int)
