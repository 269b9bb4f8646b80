"""Pictures for people: keypoints on images, sample grids, first-layer filters, CED curves (PNG via OpenCV)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from fkp_core.constants import CONTOURS

GREEN = (80, 220, 80)
MAGENTA = (255, 60, 255)
PALETTE = [(255, 140, 40), (60, 200, 255), (80, 220, 80), (255, 60, 255), (60, 60, 255), (0, 215, 255)]


def _bgr(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img.copy()


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    color: tuple[int, int, int] = GREEN,
    radius: int | None = None,
    contours: bool = True,
    thickness: int | None = None,
) -> np.ndarray:
    """A BGR copy of ``image`` with one or more faces' (68, 2) keypoints drawn (dots and region lines)."""
    out = _bgr(image)
    faces = np.asarray(keypoints, dtype=np.float32).reshape(-1, 68, 2)
    for kp in faces:
        extent = float(np.ptp(kp[:, 0])) if len(kp) else 0.0
        r = radius if radius is not None else max(1, int(round(extent / 60)))
        t = thickness if thickness is not None else max(1, r // 2)
        if contours:
            for idx, closed in CONTOURS:
                pts = np.round(kp[list(idx)] * 16).astype(np.int32)
                cv2.polylines(out, [pts], closed, color, t, cv2.LINE_AA, shift=4)
        for x, y in kp:
            cv2.circle(out, (int(round(x * 16)), int(round(y * 16))), r * 16, color, -1, cv2.LINE_AA, shift=4)
    return out


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = size / max(h, w)
    img = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.full((size, size, 3), 255, np.uint8)
    y0, x0 = (size - img.shape[0]) // 2, (size - img.shape[1]) // 2
    canvas[y0 : y0 + img.shape[0], x0 : x0 + img.shape[1]] = img
    return canvas


def _label(tile: np.ndarray, text: str) -> None:
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def sample_grid(
    images: Sequence[np.ndarray],
    truth: Sequence[np.ndarray] | None = None,
    predicted: Sequence[np.ndarray] | None = None,
    labels: Sequence[str] | None = None,
    columns: int = 5,
    tile: int = 200,
) -> np.ndarray:
    """A grid of images with ground truth (green) and predictions (magenta): notebook 1's view."""
    tiles = []
    for i, image in enumerate(images):
        img = _bgr(image)
        if truth is not None:
            img = draw_keypoints(img, truth[i], GREEN, contours=False)
        if predicted is not None:
            img = draw_keypoints(img, predicted[i], MAGENTA, contours=False)
        t = _fit(img, tile)
        if labels is not None:
            _label(t, labels[i])
        tiles.append(t)
    return _tile(tiles, columns, tile)


def _tile(tiles: list[np.ndarray], columns: int, tile: int, pad: int = 2) -> np.ndarray:
    if not tiles:
        return np.full((tile, tile, 3), 255, np.uint8)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    th, tw = tiles[0].shape[:2]
    grid = np.full((rows * (th + pad) + pad, columns * (tw + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y : y + th, x : x + tw] = t
    return grid


def _normalize01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


@torch.inference_mode()
def conv_filters_and_maps(model: torch.nn.Module, crop: np.ndarray, tile: int = 64, columns: int = 8) -> np.ndarray:
    """First conv layer's filters (top rows) and their feature maps on ``crop`` (below): notebook 2's view."""
    conv = model.first_conv  # type: ignore[attr-defined]
    weights = conv.weight.detach().cpu().numpy()[:, 0]  # (C, k, k)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / (255.0 if crop.dtype == np.uint8 else 1.0))[None, None]
    x = (x - model._mean) / model._std  # type: ignore[attr-defined]
    maps = conv(x.to(conv.weight.device)).cpu().numpy()[0]
    tiles = []
    for w in weights:
        t = cv2.resize((_normalize01(w) * 255).astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST)
        tiles.append(cv2.cvtColor(t, cv2.COLOR_GRAY2BGR))
    for m in maps:
        t = cv2.resize((_normalize01(m) * 255).astype(np.uint8), (tile, tile), interpolation=cv2.INTER_AREA)
        tiles.append(cv2.applyColorMap(t, cv2.COLORMAP_VIRIDIS))
    return _tile(tiles, columns, tile)


def ced_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], size: tuple[int, int] = (640, 440), title: str = "") -> np.ndarray:
    """Cumulative error distribution curves (x: NME, y: fraction of faces) drawn with OpenCV."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 30, 50
    pw, ph = w - left - right, h - top - bottom
    xmax = max(float(xs[-1]) for xs, _ in curves.values()) if curves else 0.1
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k in range(6):  # grid and ticks
        fx = xmax * k / 5
        x = left + int(pw * k / 5)
        cv2.line(img, (x, top), (x, top + ph), (225, 225, 225), 1)
        cv2.putText(img, f"{fx:.2f}", (x - 14, top + ph + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        y = top + ph - int(ph * k / 5)
        cv2.line(img, (left, y), (left + pw, y), (225, 225, 225), 1)
        cv2.putText(img, f"{k / 5:.1f}", (left - 30, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    cv2.putText(img, "NME (inter-ocular)", (left + pw // 2 - 60, h - 12), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, title or "Cumulative error distribution", (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = np.stack([left + xs / xmax * pw, top + ph - ys * ph], axis=1)
        cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], False, color, 2, cv2.LINE_AA, shift=4)
        cv2.putText(img, name, (left + pw - 260, top + ph - 14 - 18 * i), font, 0.45, color, 1, cv2.LINE_AA)
    return img


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a PNG, creating the folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(p), image):
        raise OSError(f"{p}: could not write PNG")
    return p
