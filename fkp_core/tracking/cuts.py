"""Scene cuts: a frame's signature (tones and layout of a small thumbnail) and how much two signatures differ."""

from __future__ import annotations

import cv2
import numpy as np

from fkp_core.transforms import to_gray

# A frame's signature: the block histograms and the layout of a small gray thumbnail.
SIGNATURE_SIZE = 64  # frames are compared as 64 x 64 gray thumbnails ...
SIGNATURE_GRID = 2  # ... whose 2 x 2 blocks each give a 16-bin histogram (the tones) ...
SIGNATURE_BINS = 16
LAYOUT_SIZE = 16  # ... and whose 16 x 16 reduction, normalised to zero mean and unit norm, is the layout.
# A cut needs both to change. Tones: mean Hellinger distance of the block histograms (0 same, 1
# disjoint); consecutive frames of a shot (motion, noise) score < 0.12 on generated scenes,
# different scenes 0.23-0.75. Layout: 1 - normalised correlation of the 16 x 16 thumbnails (0 same,
# ~1 unrelated); a pan of 6 % of the frame width scores 0.1-0.2, a brightness change 0, different
# scenes 0.55-1.2. A flash thus changes tones but not layout, a fast pan layout but not tones.
CUT_TONE_DISTANCE = 0.2
CUT_LAYOUT_DISTANCE = 0.4
SCENE_CUT_THRESHOLD = 1.0  # on cut_score: min(tone / CUT_TONE_DISTANCE, layout / CUT_LAYOUT_DISTANCE)


def frame_signature(image: np.ndarray) -> np.ndarray:
    """A small summary of a frame for cut detection: a float32 vector (block histograms, then layout).

    Gray, BGR or BGRA input of any size (float images in [0, 1] or [0, 255]). A segment task keeps
    the signature of its previous frame (cheaper than keeping the frame) and returns those of its
    first and last frames for :func:`stitch_segments`.
    """
    gray = to_gray(np.asarray(image))
    if gray.dtype != np.uint8:
        g = gray.astype(np.float64)
        gray = np.clip(g * (255.0 if g.size and g.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    # Sample a 2x grid of pixels (nearest) and average each 2 x 2 of it: the thumbnail reads 4 pixels
    # per thumbnail pixel, not the whole frame, which is enough to be insensitive to noise. Both
    # resizes take OpenCV's fast paths (an area resize by a fraction does not): ~15 us on 640x480,
    # run on every frame of every video.
    side = 2 * SIGNATURE_SIZE
    if min(gray.shape[0], gray.shape[1]) >= side:
        gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_NEAREST)
    thumb = cv2.resize(gray, (SIGNATURE_SIZE, SIGNATURE_SIZE), interpolation=cv2.INTER_AREA)
    step = SIGNATURE_SIZE // SIGNATURE_GRID
    blocks = thumb.reshape(SIGNATURE_GRID, step, SIGNATURE_GRID, step).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(SIGNATURE_GRID**2, -1)
    # one bincount over (block, bin) pairs
    bins = (blocks.astype(np.int64) * SIGNATURE_BINS) // 256 + (np.arange(SIGNATURE_GRID**2) * SIGNATURE_BINS)[:, None]
    hist = np.bincount(bins.ravel(), minlength=SIGNATURE_GRID**2 * SIGNATURE_BINS).astype(np.float64)
    hist = hist.reshape(SIGNATURE_GRID**2, SIGNATURE_BINS)
    hist /= hist.sum(axis=1, keepdims=True)
    layout = cv2.resize(thumb, (LAYOUT_SIZE, LAYOUT_SIZE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    layout -= layout.mean()
    norm = np.linalg.norm(layout)
    layout = layout / norm if norm > 0 else layout
    return np.concatenate([hist.ravel(), layout]).astype(np.float32)


_HIST_LEN = SIGNATURE_GRID**2 * SIGNATURE_BINS
SIGNATURE_LENGTH = _HIST_LEN + LAYOUT_SIZE**2


def cut_score(a: np.ndarray, b: np.ndarray) -> float:
    """How strongly two frame signatures look like a cut: > :data:`SCENE_CUT_THRESHOLD` (1.0) is a cut.

    min(tone distance / CUT_TONE_DISTANCE, layout distance / CUT_LAYOUT_DISTANCE): both must change.
    A blank (flat) frame has no layout; its layout distance to anything is then 1 (unrelated).
    """
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.shape != (SIGNATURE_LENGTH,) or b.shape != (SIGNATURE_LENGTH,):
        raise ValueError(f"signatures must have {SIGNATURE_LENGTH} values, got {a.shape} and {b.shape}")
    ha = a[:_HIST_LEN].reshape(-1, SIGNATURE_BINS)
    hb = b[:_HIST_LEN].reshape(-1, SIGNATURE_BINS)
    tone = float(np.sqrt(np.clip(1.0 - np.sqrt(ha * hb).sum(axis=-1), 0.0, 1.0)).mean())
    layout = 1.0 - float(a[_HIST_LEN:] @ b[_HIST_LEN:])
    return min(tone / CUT_TONE_DISTANCE, layout / CUT_LAYOUT_DISTANCE)
