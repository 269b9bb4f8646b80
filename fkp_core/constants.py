"""The iBUG-68 keypoint layout: the one place its numbers live.

Left and right are the subject's, as in the iBUG annotation guide: the subject's right eye
(points 36-41) appears on the image's left in a frontal photo.
"""

from __future__ import annotations

NUM_KEYPOINTS = 68

# Still images: read as data sets and as one-frame videos, written back by --render.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Half-open index ranges of the facial regions, in iBUG-68 order.
REGIONS: dict[str, range] = {
    "jaw": range(0, 17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "mouth": range(48, 68),
}
RIGHT_BROW = range(17, 22)
LEFT_BROW = range(22, 27)
NOSE_BRIDGE = range(27, 31)
NOSE_BOTTOM = range(31, 36)
RIGHT_EYE = range(36, 42)
LEFT_EYE = range(42, 48)
OUTER_LIPS = range(48, 60)
INNER_LIPS = range(60, 68)

# Landmarks other modules reason about by name.
RIGHT_EYE_OUTER = 36
LEFT_EYE_OUTER = 45
NOSE_TIP = 30
CHIN = 8
JAW_RIGHT_END = 0  # the jaw line's end at the subject's right ear
JAW_LEFT_END = 16
MOUTH_RIGHT = 48
MOUTH_LEFT = 54

# Point i of a mirrored face is point FLIP_PERMUTATION[i] of the original.
_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    *((i, 16 - i) for i in range(8)),            # jaw
    *((17 + i, 26 - i) for i in range(5)),       # brows
    (31, 35), (32, 34),                          # nose bottom
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),            # outer lips
    (60, 64), (61, 63), (65, 67),                                # inner lips
)


def _flip_permutation() -> tuple[int, ...]:
    perm = list(range(NUM_KEYPOINTS))
    for a, b in _FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return tuple(perm)


FLIP_PERMUTATION: tuple[int, ...] = _flip_permutation()

# How far right of what they mark (pixel centres) each kind of source's labels sit, in pixels of its images: mirroring
# a face must move its labels by twice this beyond the pixels' mirror image, or the flipped copy teaches the network a
# point 2x this far from where the unflipped one does. Measured by mirror consistency on the training faces (the
# default model on each face and on its mirror image; AFW is not used): `python -m jobs.evaluate --data
# ibug:../shared/data/300w/helen --data course:../shared/data/fkp --split training --fit-mirror` (docs/experiments.md).
LABEL_X_OFFSET: dict[str, float] = {"ibug": 0.86, "course": 1.27}

# The shifted view (fkp_core.shifted_view, jobs' --shifted-view): how far each face's last crop is moved, right and
# down, in crop pixels, for a second look whose pixel grid falls differently on the face: half a heatmap cell of every
# bundled model (stride 8). The direction was chosen on the training sources' validation faces (course + HELEN, never
# AFW), where moving down-right beat up-left, the diagonals and single axes (docs/experiments.md).
SHIFTED_VIEW_PIXELS = 4

# ONNX Runtime holds every layer's activations for a whole call: the most crops it runs at once (larger inputs are
# cut into calls of this many), so that an evaluation's or a fit's thousands of crops do not run the machine out of
# memory; per-face time hardly depends on it (docs/experiments.md, session 9).
ONNX_MAX_BATCH = 32

# Polylines that draw a face: (indices, closed).
CONTOURS: tuple[tuple[range, bool], ...] = (
    (REGIONS["jaw"], False),
    (RIGHT_BROW, False),
    (LEFT_BROW, False),
    (NOSE_BRIDGE, False),
    (NOSE_BOTTOM, False),
    (RIGHT_EYE, True),
    (LEFT_EYE, True),
    (OUTER_LIPS, True),
    (INNER_LIPS, True),
)

# More named landmarks (head pose and tracking reason about them).
RIGHT_BROW_OUTER = 17
RIGHT_BROW_INNER = 21
LEFT_BROW_INNER = 22
LEFT_BROW_OUTER = 26
NASION = 27  # top of the nose bridge, between the eyes
RIGHT_NOSTRIL = 31  # the nose bottom's subject-right end
SUBNASALE = 33  # the nose bottom's centre
LEFT_NOSTRIL = 35
RIGHT_EYE_INNER = 39
LEFT_EYE_INNER = 42

# Training: the metric that picks a run's best epoch (mean validation NME over the training sources).
SELECTION_METRIC = "val_nme"
# Learned keypoint scores (ModelConfig.point_sigma): the expected point error (crop units of [-1, 1]) a new
# error head starts at, and the error it learns for crops with no face in them (jobs.train --nonface)
POINT_SIGMA_INIT = 0.05
NONFACE_ERROR = 1.0
POINT_SIGMA_LR_SCALE = 10.0  # the error head's learning rate over the run's --lr (fkp_core.training.make_optimizer)
# The pixel-in-pixel read-out (fkp_core.pip_head, ModelConfig.head = "pip"): neighbours that vote for each point,
# the cells around a point's own whose offsets are trained (0: its cell only), and the cell classifier's weight in
# the loss against the offsets' L1 (in cells)
PIP_NEIGHBOURS = 10
PIP_CELL_RADIUS = 1
PIP_CLASS_WEIGHT = 0.2
# synthetic three-quarter views (augment.RandomThreeQuarterView): the largest turn, degrees; the head's depth
# profile keeps the image map one-to-one below atan(0.5) = 26.6 degrees
THREE_QUARTER_MAX_YAW = 20.0

# Per-keypoint scores (fkp_core.confidence): a point's expected error in crop units of [-1, 1] (its heatmap's
# spread, RMS distance of its softmax mass from the soft-argmax, or its learned error head's output) maps to 1 at
# or below SHARP and to 0 at or above FLAT, linearly in log. A model's JSON carries its own under "keypoint_score"
# (every bundled one does); these are the range of models without one: those of `hm`, the former default (SHARP the
# 5th percentile over labelled training faces, course training + HELEN; FLAT the median over non-face crops of the
# same images; both printed by `python -m jobs.evaluate --fit-confidence`, docs/confidence.md).
KEYPOINT_SPREAD_SHARP = 0.225
KEYPOINT_SPREAD_FLAT = 0.572

# Face confidence (fkp_core.confidence.face_confidence): sigmoid(BIAS + DETECTOR * logit(detector score)
# + FIT * mean keypoint score) x consistency, the weights fitted by logistic regression on training images
# (course training + HELEN: `python -m jobs.evaluate --fit-confidence`), never on AFW, with the default model's
# keypoint scores. A model's JSON carries the weights fitted with its own scores under "face_confidence"
# (confidence.FaceConfidenceWeights; the bundled hm, fast and fastest do); these are for models without them
FACE_CONF_BIAS = -18.11
FACE_CONF_DETECTOR = 7.65
FACE_CONF_FIT = 6.55
# detectors without meaningful scores (Haar): sigmoid(FIT_ONLY_BIAS + FIT_ONLY * mean keypoint score), fitted the same way
FACE_CONF_FIT_ONLY_BIAS = -11.77
FACE_CONF_FIT_ONLY = 22.20
FACE_DETECTOR_SCORE_CLIP = (0.01, 0.99)  # detector scores are clipped to this before the logit (Haar says 1 for all)
FACE_FIT_UNKNOWN = 0.5  # the fit term of models without per-keypoint scores (fully connected heads)
# jobs.annotate --min-confidence default: faces below it are dropped. Chosen on the development clips: the
# logistic model is fitted on clean still images, where real faces have high detector scores, so on video it
# undervalues real faces with middling detector scores (turned, small); the false ones it must drop (Haar's,
# YuNet's on ears and backs of heads) score far below this (docs/confidence.md)
MIN_FACE_CONFIDENCE = 0.1
# the fast path runs the detector when a tracked face's confidence falls below this (or its fit's
# consistency below tracking.REDETECT_BELOW), and keeps a face the detector missed only above both
REDETECT_CONFIDENCE = MIN_FACE_CONFIDENCE
