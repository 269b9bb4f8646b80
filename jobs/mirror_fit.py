"""``jobs.evaluate --fit-mirror``: a model's horizontal offset for the mirrored pass, and each source's label offset.

Every face is cropped as training crops it (the upright frame of its labels) and predicted on the crop and on
its mirror image. Half the mean gap between the two, mapped back, is the model's offset (``"mirror_offset"`` in
its JSON, crop units: :func:`fkp_core.mirror.offset_between`). Against the labels, the same two predictions
also tell how far right of what they mark a source's labels sit (:data:`fkp_core.constants.LABEL_X_OFFSET`): a
network places a point the same distance from the feature on a face and on its mirror, so the labels' offset
is minus the mean of the two predictions' horizontal errors. Fit on training sources only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from fkp_core.dataset import read_image
from fkp_core.mirror import both_views, offset_between
from fkp_core.transforms import crop_face, face_frame, uncrop_keypoints


@dataclass(frozen=True)
class MirrorFit:
    """One source's measurement."""

    source: str
    faces: int
    mirror_offset: float  # the model's, crop units
    model_offset_px: float  # the same, in pixels of the source's images
    label_offset_px: float  # how far right of what they mark the labels sit


def measure_source(landmarker, label: str, records, every: int = 1) -> MirrorFit:
    """Crop every ``every``-th face of one source as training does and measure both offsets."""
    records = list(records)[::every]
    crops, matrices, labels = [], [], []
    for rec in records:
        gray = read_image(rec.image_path)
        box, angle = face_frame(rec.keypoints[None], landmarker.upright)
        crop, m = crop_face(gray, box[0], landmarker.size, landmarker.margin, float(angle[0]))
        crops.append(crop)
        matrices.append(m)
        labels.append(rec.keypoints)
    plain, back = both_views(landmarker.predict_crops, np.stack(crops))
    offset = offset_between(plain, back)
    size = landmarker.size
    dx_plain = np.mean([(uncrop_keypoints(p[:, :2], m, size) - g)[:, 0].mean() for p, m, g in zip(plain, matrices, labels)])
    dx_back = np.mean([(uncrop_keypoints(p[:, :2], m, size) - g)[:, 0].mean() for p, m, g in zip(back, matrices, labels)])
    return MirrorFit(label, len(records), offset, float((dx_plain - dx_back) / 2), float(-(dx_plain + dx_back) / 2))


def run_fit(landmarker, sources, split: str, every: int) -> int:
    """Print each source's offsets and the model's offset: their mean, each source weighing the same (as in training)."""
    fits = []
    for src in sources:
        records = src.read(split) if src.kind == "course" else src.read()
        fit = measure_source(landmarker, src.label, records, every)
        fits.append(fit)
        print(f"{src.label:>10}: {fit.faces} faces | model offset {fit.mirror_offset:+.5f} crop units "
              f"({fit.model_offset_px:+.2f} px) | labels {fit.label_offset_px:+.2f} px right of what they mark")
    offset = float(np.mean([f.mirror_offset for f in fits]))
    print(json.dumps({"mirror_offset": round(offset, 5), "per_source": [asdict(f) for f in fits]}, indent=2))
    print(f'add "mirror_offset": {offset:.5f} to the model\'s JSON to turn its mirrored refine pass on')
    return 0
