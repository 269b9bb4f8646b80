"""Pixel-in-pixel read-out (PIPNet, Jin et al. 2021): per point, which heatmap cell holds it, where in that cell,
and where its nearest neighbours on the mean face lie from there; each point is the mean of its own estimate and
its neighbours' estimates of it. A dual head averages that with the soft-argmax of heatmaps of the same decoder.

A soft-argmax (:class:`~fkp_core.model.HeatmapHead`) places a point at its heatmap's mean, trained as a whole; here
the point is read at the peak of a map trained to classify its cell, with an offset trained on the cells around
it, and the neighbours' votes tie it to the shape around it. The two err in different places (docs/experiments.md),
which is what the dual head's average is for. The decoder is :class:`HeatmapHead`'s, so a trained heatmap
model's decoder (and, dual, its heatmaps) carry over (:func:`fkp_core.training.initial_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fkp_core.constants import (
    NUM_KEYPOINTS,
    PIP_CELL_RADIUS,
    PIP_CLASS_WEIGHT,
    PIP_NEIGHBOURS,
)
from fkp_core.model import HeatmapHead


def neighbour_table(mean_shape: np.ndarray, k: int) -> tuple[int, ...]:
    """Each point's ``k`` nearest other points on ``mean_shape`` (68, 2), flattened row by row (68 * k)."""
    d = np.linalg.norm(mean_shape[:, None] - mean_shape[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return tuple(int(j) for j in np.argsort(d, axis=1, kind="stable")[:, :k].ravel())


def neighbours_of(shapes: np.ndarray | None, k: int = PIP_NEIGHBOURS) -> tuple[int, ...]:
    """The neighbour table (:func:`neighbour_table`) of the mean of a run's training shapes (N, 68, 2)."""
    if shapes is None or not len(shapes):
        raise ValueError("a pip read-out needs training shapes for its neighbours")
    return neighbour_table(mean_shape(shapes), k)


def mean_shape(keypoints: np.ndarray) -> np.ndarray:
    """The mean of (N, 68, 2) shapes, each centred and scaled to unit RMS radius first."""
    centred = keypoints - keypoints.mean(axis=1, keepdims=True)
    scale = np.sqrt((centred**2).sum(-1).mean(-1))[:, None, None]
    return (centred / np.maximum(scale, 1e-9)).mean(axis=0)


@dataclass(frozen=True)
class PipMaps:
    """What training fits: the cell logits (N, 68, h, w), the decoder's features (N, C, h, w) that the offsets and
    neighbours are read from (:meth:`PipHead.read`) and, for a dual head, the soft-argmax points (N, 68, 2)."""

    logits: torch.Tensor
    features: torch.Tensor
    soft: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> PipMaps:
        """The maps of some crops (a boolean mask or indices over N)."""
        return PipMaps(self.logits[rows], self.features[rows], None if self.soft is None else self.soft[rows])


class PipHead(HeatmapHead):
    """:class:`HeatmapHead`'s decoder with cell logits of its own (``cells``), read at their peak with learned offsets
    and neighbours' votes; ``dual``: the points are the mean of that read-out and the soft-argmax of the heatmaps
    (``out``), two read-outs of one decoder that err in different places (the soft-argmax, a map's mean, on ambiguous
    points such as the jaw; the peak on sharp ones such as the eyes), at the cost of one more 1x1 convolution.

    The offsets and neighbours are 1x1 convolutions on the decoder's features, evaluated only at the cells read (a
    full map of 68 x K x 2 neighbour channels would cost a third of the network). Keypoint scores come from the
    heatmaps of the soft-argmax read-out (dual) or from the cells' (pip)."""

    def __init__(self, stage_channels: list[int], stage_strides: list[int], out_stride: int, channels: int, size: int,
                 neighbours: tuple[int, ...], point_sigma: bool = False, expand: int = 0, dual: bool = False,
                 context: bool = False):
        super().__init__(stage_channels, stage_strides, out_stride, channels, size, point_sigma, expand, context)
        if not neighbours or len(neighbours) % NUM_KEYPOINTS:
            raise ValueError(f"neighbours must list K >= 1 points for each of the {NUM_KEYPOINTS}")
        k = len(neighbours) // NUM_KEYPOINTS
        self.k = k
        self.dual = dual
        self.cells = nn.Conv2d(channels, NUM_KEYPOINTS, 1)
        self.offset = nn.Conv2d(channels, NUM_KEYPOINTS * 2, 1)
        self.nb = nn.Conv2d(channels, NUM_KEYPOINTS * k * 2, 1)
        for conv in (self.offset, self.nb):  # zero: a new read-out starts at the cells' centres
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        table = torch.tensor(neighbours, dtype=torch.long).view(NUM_KEYPOINTS, k)
        self.register_buffer("table", table, persistent=False)
        # votes (68 targets x 68*K voters): vote m = (i, n) is point i's estimate of its n-th neighbour table[i, n]
        votes = torch.zeros(NUM_KEYPOINTS, NUM_KEYPOINTS * k)
        votes[table.flatten(), torch.arange(NUM_KEYPOINTS * k)] = 1.0
        self.register_buffer("_votes", votes, persistent=False)
        self.register_buffer("_voters", 1.0 + votes.sum(1), persistent=False)

    def read(self, features: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's offset (N, 68, 2) and its neighbours' (N, 68, K, 2), in cells from the centre of the cell
        ``index`` (N, 68, a flat index into h x w) it is read at."""
        n, c = features.shape[:2]
        at = features.flatten(2).gather(2, index[:, None, :].expand(-1, c, -1)).transpose(1, 2)  # (N, 68, C)
        off = torch.einsum("nic,ioc->nio", at, self.offset.weight.view(NUM_KEYPOINTS, 2, c)) + self.offset.bias.view(NUM_KEYPOINTS, 2)
        nb = torch.einsum("nic,ioc->nio", at, self.nb.weight.view(NUM_KEYPOINTS, 2 * self.k, c)) + self.nb.bias.view(NUM_KEYPOINTS, -1)
        return off, nb.view(n, NUM_KEYPOINTS, self.k, 2)

    def peak_points(self, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The pixel-in-pixel points (N, 68, 2): each point's own estimate from its peak cell merged with its
        neighbours' votes."""
        w = cells.shape[-1]
        peak = cells.flatten(2).argmax(dim=-1)  # (N, 68)
        cell = 2.0 / w
        centre = torch.stack([self._grid[peak % w], self._grid[torch.div(peak, w, rounding_mode="floor")]], dim=-1)
        off, nb = self.read(x, peak)
        own = centre + cell * off  # (N, 68, 2)
        votes = (centre[:, :, None] + cell * nb).flatten(1, 2)  # (N, 68 * K, 2)
        return (own + torch.einsum("jm,nmc->njc", self._votes, votes)) / self._voters[:, None]

    def forward(self, stages: list[torch.Tensor], scores: bool = False, log_sd: bool = False) -> torch.Tensor:
        """As :meth:`HeatmapHead.forward`, the points read at each cell map's peak (and, dual, averaged with the
        heatmaps' soft-argmax)."""
        return self.with_maps(stages, scores, log_sd)[0]

    def with_maps(self, stages: list[torch.Tensor], scores: bool = False, log_sd: bool = False) -> tuple[torch.Tensor, PipMaps]:
        """:meth:`forward`'s output and the maps it was read from."""
        x = self.features(stages)
        cells = self.cells(x)
        points = self.peak_points(x, cells)
        n, k, h, w = cells.shape
        heatmaps = self.logits(x) if self.dual else cells
        prob = torch.softmax(heatmaps.flatten(2), dim=-1).view(n, k, h, w)
        soft = None
        if self.dual:
            soft = torch.stack(self.soft_argmax(prob), dim=-1)
            points = (points + soft) / 2
        mean = None if soft is None else (soft[..., 0], soft[..., 1])
        return self.readout(x, prob, points[..., 0], points[..., 1], scores, log_sd, mean), PipMaps(cells, x, soft)


def pip_loss(maps: PipMaps, targets: torch.Tensor, head: PipHead, class_weight: float = PIP_CLASS_WEIGHT,
             radius: int = PIP_CELL_RADIUS) -> torch.Tensor:
    """Cross-entropy of the cell holding each point, plus L1 of the offsets (in cells) to the point and to its
    neighbours from every cell within ``radius`` of it that is on the map, so that a peak one cell off still reads
    the right place (a point at the border has fewer such cells, each counted once)."""
    w = maps.logits.shape[-1]
    u = (targets + 1) * (w / 2)  # (N, 68, 2) in cells, x then y
    cell = u.detach().floor().clamp(0, w - 1).long()
    cls = F.cross_entropy(maps.logits.flatten(2).flatten(0, 1), (cell[..., 1] * w + cell[..., 0]).flatten())
    off_err = nb_err = cells = 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            at = cell + torch.tensor([dx, dy], device=cell.device)  # (N, 68, 2)
            on = ((at >= 0) & (at < w)).all(dim=-1).to(u.dtype)  # (N, 68): the cell is on the map
            at = at.clamp(0, w - 1)
            centre = at.to(u.dtype) + 0.5
            off, nb = head.read(maps.features, at[..., 1] * w + at[..., 0])
            off_err = off_err + ((off - (u - centre)).abs().mean(dim=-1) * on).sum()
            nb_err = nb_err + ((nb - (u[:, head.table] - centre[:, :, None])).abs().mean(dim=(-2, -1)) * on).sum()
            cells = cells + on.sum()
    return class_weight * cls + (off_err + nb_err) / cells


def head_loss(maps: PipMaps, targets: torch.Tensor, head: PipHead, point_loss) -> torch.Tensor:
    """A pip or dual head's loss on face crops: :func:`pip_loss`, plus ``point_loss`` (the run's loss on points) of
    the dual head's soft-argmax."""
    soft = point_loss(maps.soft, targets) if maps.soft is not None else 0.0
    return soft + pip_loss(maps, targets, head)
