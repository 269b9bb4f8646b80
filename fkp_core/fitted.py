"""What is fitted to a trained model after training and travels in its JSON: the values, beside the weights, that
inference needs to use that model's output.

A model's keypoint scores are on its own scale, so the face confidence's weights are fitted with it
(``"face_confidence"``, ``jobs.evaluate --fit-confidence``); its points sit a model-specific distance off their mirror
image's, so the mirrored pass has its own offset (``"mirror_offset"``, ``jobs.evaluate --fit-mirror``). One value
carries both wherever the network goes: the Landmarker, a segment's network (local or remote) and its exported form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fkp_core.confidence import DEFAULT_FACE_WEIGHTS, FaceConfidenceWeights


@dataclass(frozen=True)
class ModelFit:
    """A model's fitted values: the face confidence's weights, and the mirrored pass's horizontal offset in crop units
    (:mod:`fkp_core.mirror`; None: not fitted, so no mirrored pass). The defaults are a bare network's: the default
    model's face-confidence weights and no mirrored pass."""

    face_weights: FaceConfidenceWeights = DEFAULT_FACE_WEIGHTS
    mirror_offset: float | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelFit:
        """The values in a model's JSON metadata, the defaults for those it has none of."""
        offset = metadata.get("mirror_offset")
        has_offset = isinstance(offset, (int, float)) and not isinstance(offset, bool)
        return cls(FaceConfidenceWeights.from_metadata(metadata), float(offset) if has_offset else None)

    def mirrored(self, on: bool) -> ModelFit:
        """These values with the mirrored pass kept (``on``, where fitted) or turned off."""
        return self if on else replace(self, mirror_offset=None)
