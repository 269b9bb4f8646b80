"""The training loop's parts, torch only: datasets of face crops, weighted sampling, loss, epochs, validation.

``jobs.train`` wires these into Ray Train; a notebook or a test can use them alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from fkp_core.augment import RandomFaceOccluder, RandomJpeg, RandomLowLight, RandomMotionBlur, RandomNonFace, RandomThreeQuarterView, UprightFaceCrop
from fkp_core.constants import NONFACE_ERROR, POINT_SIGMA_LR_SCALE, SELECTION_METRIC
from fkp_core.dataset import DatasetError, DataSource, Record, read_image, split_by_identity
from fkp_core.metrics import nme
from fkp_core.model import PIP_HEADS
from fkp_core.pip_head import head_loss, neighbours_of
from fkp_core.mirror import unmirror
from fkp_core.pose import turn_index
from fkp_core.transforms import (
    CROP_MARGIN,
    AugmentConfig,
    Compose,
    FaceCrop,
    RandomBlur,
    RandomBrightnessContrast,
    RandomDownscale,
    RandomHorizontalFlip,
    RandomNoise,
    RandomOcclusion,
    RandomRotation,
    RandomScale,
    RandomTranslate,
    Sample,
    ToFloat,
    Transform,
    Warp,
    eval_transform,
    to_tensors,
    train_transform,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run learns (recorded in the model's metadata)."""

    model: str = "hm"
    input_size: int | None = None  # overrides the preset's
    init: str | None = None  # start from this release model's weights (and architecture): fine-tuning
    distill: str | None = None  # teacher release model: also fit its predictions on the same crops
    distill_weight: float = 0.5  # share of the loss that is the teacher's (the rest: the labels)
    distill_mirror: bool = False  # the teacher teaches its mirrored pass (Teacher.mirror_offset), not one look
    epochs: int = 120
    batch_size: int = 64  # per worker
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 2.0
    loss: str = "wing"  # wing | l1 | mse
    val_fraction: float = 0.1
    seed: int = 0
    loader_workers: int = 2
    pretrained: bool = False  # initialise the backbone from its ImageNet weights (the 'train' extra)
    freeze_stride: int = 0  # keep backbone layers up to this output stride at their initial weights (0: train all)
    prune: float = 1.0  # with init: keep this share of the hidden channels of its blocks up to prune_stride (fkp_core.pruning)
    prune_stride: int = 8
    # faces in the wild (probabilities per crop; 0 everywhere: the original recipe, train_transform)
    occluders: float = 0.0  # an object over the mouth or eyes (RandomFaceOccluder)
    low_light: float = 0.0  # dim, noisy frame (RandomLowLight)
    motion_blur: float = 0.0  # directional blur (RandomMotionBlur)
    jpeg: float = 0.0  # JPEG round trip at quality 10-70 (RandomJpeg)
    three_quarter: float = 0.0  # the face turned about its vertical axis (RandomThreeQuarterView)
    # learned keypoint scores: give the heatmap head an error head (ModelConfig.point_sigma) and fit it, and the
    # share of crops turned into non-faces (RandomNonFace) that teach it what a lost point looks like
    point_sigma: bool = False
    nonface: float = 0.0
    upright: bool = False  # train on upright crops (eyes level) whatever the preset or --init model says
    mirror_course: bool = False  # flip course crops too (with their labels' offset), not only the 300-W sources'
    head_expand: int = 0  # add a hidden layer of this width to the heatmap read-out (ModelConfig.head_expand; 0: as is)
    head: str | None = None  # "pip" or "dual": a pixel-in-pixel read-out, alone or beside the soft-argmax (fkp_core.pip_head)
    context: bool = False  # the backbone's next stride read into the decoder (ModelConfig.context), grown onto an init model
    pose_balance: float = 0.0  # draw turned faces up to 1 + this times as often as frontal ones (pose_balanced)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and exported instead (0: off)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        aug = data.pop("augment", {}) or {}
        if "scale" in aug:
            aug["scale"] = tuple(aug["scale"])
        return cls(**data, augment=AugmentConfig(**aug))


class KeypointDataset(Dataset):
    """Records -> (crop tensor, normalized keypoints, source index), images decoded once and kept in memory.

    Randomness comes from (seed, epoch, index), so a sample's augmentation does not depend on which
    loader worker or Ray worker draws it, and a resumed run sees the same stream.
    """

    def __init__(self, records: Sequence[Record], transform: Compose, seed: int = 0, sources: Sequence[str] | None = None,
                 per_source: dict[str, Compose] | None = None):
        self.records = list(records)
        self.transform = transform
        self.per_source = dict(per_source or {})  # a source's own transform (e.g. with flips), else `transform`
        self.seed = seed
        self.epoch = 0
        self.sources = list(sources) if sources is not None else sorted({r.source for r in self.records})
        self._source_index = [self.sources.index(r.source) for r in self.records]
        self._images = [read_image(r.image_path) for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        transform = self.per_source.get(self.records[i].source, self.transform)
        sample = transform(Sample(self._images[i], self.records[i].keypoints.copy()), rng)
        image, keypoints = to_tensors(sample)
        return image, keypoints, self._source_index[i]


def loader_worker_init(_worker_id: int) -> None:
    """One thread per data-loading process: many processes already share the cores."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class WeightedDistributedSampler(Sampler[int]):
    """Draw an epoch's indices with per-sample weights (with replacement), sharded over ranks.

    Each source then contributes in proportion to its weight, whatever its size; every rank sees a
    disjoint slice of the same epoch-seeded draw, as DistributedSampler does for uniform sampling.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = num_samples - num_samples % world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        return iter(idx[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size


def source_weights(records: Sequence[Record], weights: dict[str, float]) -> list[float]:
    """Per-sample weights that give each source a share proportional to its weight."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.source] = counts.get(r.source, 0) + 1
    total = sum(weights.get(s, 1.0) for s in counts)
    return [weights.get(r.source, 1.0) / total / counts[r.source] for r in records]


def pose_balanced(weights: Sequence[float], records: Sequence[Record], strength: float) -> list[float]:
    """Per-sample weights that draw a face ``1 + strength * turn`` times as often as a frontal one of its source
    (``turn``: :func:`fkp_core.pose.turn_index`), each source keeping its share of the epoch: turned faces are the
    fewest in the training sources and cost the most error in the wild."""
    base = np.asarray(weights, dtype=np.float64)
    if strength == 0 or not len(records):
        return base.tolist()
    boosted = base * (1 + strength * turn_index(np.stack([r.keypoints for r in records])))
    sources = np.array([r.source for r in records])
    for name in np.unique(sources):
        here = sources == name
        boosted[here] *= base[here].sum() / boosted[here].sum()
    return boosted.tolist()


def wing_loss(pred: torch.Tensor, target: torch.Tensor, w: float = 0.2, eps: float = 0.04) -> torch.Tensor:
    """Wing loss (Feng et al. 2018) in [-1, 1] crop units: log-shaped near zero so small errors keep a gradient."""
    x = (pred - target).abs()
    c = w - w * math.log1p(w / eps)
    return torch.where(x < w, w * torch.log1p(x / eps), x - c).mean()


LOSSES = {
    "wing": wing_loss,
    "l1": lambda p, t: (p - t).abs().mean(),
    "mse": lambda p, t: ((p - t) ** 2).mean(),
}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine, step or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return 0.1 ** int(progress / 0.4) if progress < 1 else 0.01
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


_FAST_PARTS = ("head.sigma.", "head.offset.", "head.nb.", "head.context.")  # linear read-outs that start from zero


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and biases) with the configured per-step schedule; an error head (a linear read-out
    of detached features, whose log-scale output must travel far from its start) and a pip head's offsets and
    neighbours and the context's 1x1 (read-outs that start at zero) learn at ``POINT_SIGMA_LR_SCALE`` times the rate."""
    decay, no_decay, fast = [], [], []
    for name, p in model.named_parameters():
        (fast if any(part in name for part in _FAST_PARTS) else no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:
        groups.append({"params": fast, "weight_decay": 0.0, "lr": cfg.lr * POINT_SIGMA_LR_SCALE})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    return opt, sched


def point_sigma_nll(log_sd: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Laplace negative log-likelihood of each point's error under its predicted scale (minimised where
    ``exp(log_sd)`` is the expected error): the errors are detached, so this trains the error head only.
    Rows of NaN targets (no face in the crop) count as lost points, :data:`NONFACE_ERROR` away."""
    err = (pred.detach() - target).norm(dim=-1)
    err = torch.where(torch.isnan(err), torch.full_like(err, NONFACE_ERROR), err)
    return (log_sd + err * torch.exp(-log_sd)).mean()


def teacher_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The student's crops at the teacher's input size: the same crop box (so the same [-1, 1] frame, whose
    edges are the pixels' outer edges), resampled, so a teacher of another resolution can teach."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class Teacher:
    """A distillation teacher: a release network in eval mode without gradients and, when set, the offset of its
    mirrored pass (``mirror_offset``), so that what it teaches is its prediction averaged over each crop and the
    crop's mirror image (:func:`fkp_core.mirror.averaged`): what the job gives, not one look."""

    model: nn.Module
    mirror_offset: float | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Its points (N, 68, 2) on the student's crops (N, 1, S, S), in the same [-1, 1] frame."""
        view = teacher_view(images, self.model.config.input_size)
        points = self.model(view)[..., :2]
        if self.mirror_offset is None:
            return points
        back = unmirror(self.model(view.flip(-1))[..., :2].cpu().numpy(), self.mirror_offset)
        return (points + torch.from_numpy(back).to(points.device)) / 2


def batch_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn, point_sigma: bool,
               teacher: Teacher | None = None, distill_weight: float = 0.5) -> torch.Tensor:
    """A batch's training loss: positions on the crops that hold a face (labels, and the teacher's predictions
    when distilling), plus the error head's likelihood over all crops when the model has one. A pip head's
    positions are fitted through its maps (:func:`~fkp_core.pip_head.pip_loss`) instead of ``loss_fn``."""
    core = getattr(model, "module", model)
    pip = core.config.head in PIP_HEADS
    out, maps = model(images, log_sd=point_sigma, maps=True) if pip else (model(images, log_sd=point_sigma), None)
    pred = out[..., :2]
    face = ~torch.isnan(targets).flatten(1).any(dim=1)

    def fit(target: torch.Tensor) -> torch.Tensor:  # the positions' loss on the face crops
        return loss_fn(pred[face], target) if maps is None else head_loss(maps.select(face), target, core.head, loss_fn)

    any_face = bool(face.any())
    loss = fit(targets[face]) if any_face else pred.sum() * 0.0
    if teacher is not None and any_face:
        loss = (1 - distill_weight) * loss + distill_weight * fit(teacher(images[face]))
    if point_sigma:
        loss = loss + point_sigma_nll(out[..., 2], pred, targets)
    return loss


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_name: str,
    device: torch.device,
    teacher: Teacher | None = None,
    distill_weight: float = 0.5,
    point_sigma: bool = False,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, images seen and images per second.

    With a ``teacher`` (knowledge distillation), the loss mixes the labels with the teacher's
    predictions on the very same augmented crops: a smaller network learns the larger one's
    consistent placement rather than the frame-to-frame noise of hand labels alone. With
    ``point_sigma`` the model's error head is fitted too (:func:`point_sigma_nll`). An ``ema`` (:func:`weight_average`)
    takes in the weights after every step.
    """
    model.train()
    if teacher is not None:
        teacher.model.eval()
    loss_fn = LOSSES[loss_name]
    total, count, start = 0.0, 0, time.perf_counter()
    for images, targets, _ in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = batch_loss(model, images, targets, loss_fn, point_sigma, teacher, distill_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        total += float(loss.detach()) * len(images)
        count += len(images)
    seconds = time.perf_counter() - start
    return {"loss": total / max(count, 1), "images": count, "images_per_s": count / max(seconds, 1e-9)}


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and batch-norm statistics (torch's own): on small, noisy
    data the average of the last few hundred steps generalises better than the last step's weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predictions, targets, source indices) in [-1, 1] crop units over a loader."""
    model.eval()
    preds, targets, sources = [], [], []
    for images, kp, src in loader:
        preds.append(model(images.to(device)).float().cpu().numpy())
        targets.append(kp.numpy())
        sources.append(np.asarray(src))
    if not preds:
        empty = np.zeros((0, 68, 2), np.float32)
        return empty, empty, np.zeros(0, int)
    return np.concatenate(preds), np.concatenate(targets), np.concatenate(sources)


def validation_nme(model: nn.Module, loader: DataLoader, device: torch.device, names: Sequence[str]) -> dict[str, float]:
    """NME per source of a validation loader (crop units: NME is invariant to the crop's similarity map)."""
    pred, target, src = predict(model, loader, device)
    errors = nme(pred, target) if len(pred) else np.zeros(0)
    out = {}
    for i, name in enumerate(names):
        mask = src == i
        if mask.any():
            out[name] = float(errors[mask].mean())
    return out


def _wild(cfg: TrainConfig, upright: bool) -> bool:
    return upright or any((cfg.occluders, cfg.low_light, cfg.motion_blur, cfg.jpeg, cfg.nonface, cfg.three_quarter))


def wild_transform(size: int, cfg: TrainConfig, margin: float = CROP_MARGIN, upright: bool = False, flip: float = 0.0,
                   label_shift: float = 0.0) -> Compose:
    """Training crops for faces in the wild: :func:`~fkp_core.transforms.train_transform`'s steps plus
    three-quarter views, occluders over the eyes and mouth, low light, motion blur and JPEG artefacts, on upright crops
    (roll jitter of ``cfg.augment.rotation`` degrees) when ``upright``; ``flip`` is this source's flip
    probability and ``label_shift`` its labels' :data:`~fkp_core.constants.LABEL_X_OFFSET`; ``cfg.nonface`` of the crops are moved off the face
    (:class:`~fkp_core.augment.RandomNonFace`, NaN labels). Occluders go on before the photometric steps, so that
    they are blurred, darkened and compressed with the face.
    """
    aug = cfg.augment
    steps: list[Transform] = [RandomNonFace(cfg.nonface)] if cfg.nonface > 0 else []
    if upright:
        steps.append(UprightFaceCrop(size, margin, aug.box_jitter_scale, aug.box_jitter_shift, aug.rotation))
    else:
        steps += [FaceCrop(size, margin, aug.box_jitter_scale, aug.box_jitter_shift), RandomRotation(aug.rotation, p=0.8)]
    steps += [RandomScale(*aug.scale), RandomTranslate(aug.translate), RandomHorizontalFlip(flip, label_shift), Warp()]
    if cfg.three_quarter > 0:
        steps.append(RandomThreeQuarterView(p=cfg.three_quarter))
    if aug.occlusion > 0:
        steps.append(RandomOcclusion(p=aug.occlusion))
    if cfg.occluders > 0:
        steps.append(RandomFaceOccluder(p=cfg.occluders))
    if aug.photometric:
        steps += [RandomBrightnessContrast(), RandomLowLight(p=cfg.low_light), RandomDownscale(), RandomBlur(),
                  RandomMotionBlur(p=cfg.motion_blur), RandomNoise(), RandomJpeg(p=cfg.jpeg)]
    steps.append(ToFloat())
    return Compose(steps)


def upright_eval_transform(size: int, margin: float = CROP_MARGIN) -> Compose:
    """The inference view of an upright model: the level crop of the keypoints' face frame, nothing random."""
    return Compose([UprightFaceCrop(size, margin), Warp(), ToFloat()])


def make_datasets(
    train_records: Sequence[Record], val_records: Sequence[Record], cfg: TrainConfig, input_size: int, margin: float,
    upright: bool = False, mirror_sources: Mapping[str, float] | None = None,
) -> tuple[KeypointDataset, KeypointDataset]:
    """Training set (augmented crops) and validation set (inference crops of keypoint boxes).

    Horizontal flips (``cfg.augment.flip``) apply to the ``mirror_sources`` only, each flipped with its labels'
    offset (source label -> :data:`~fkp_core.constants.LABEL_X_OFFSET`): sources whose labels are mirror-symmetric
    under the iBUG permutation once that offset is kept (300-W, and the course set with ``cfg.mirror_course``).
    """
    names = sorted({r.source for r in [*train_records, *val_records]})
    mirror = dict(mirror_sources or {}) if cfg.augment.flip > 0 else {}
    if _wild(cfg, upright):
        base = wild_transform(input_size, cfg, margin, upright, flip=0.0)
        per_source = {name: wild_transform(input_size, cfg, margin, upright, cfg.augment.flip, shift) for name, shift in mirror.items()}
        val_tf = upright_eval_transform(input_size, margin) if upright else eval_transform(input_size, margin)
    else:
        base = train_transform(input_size, replace(cfg.augment, flip=0.0), margin)
        per_source = {name: train_transform(input_size, cfg.augment, margin, shift) for name, shift in mirror.items()}
        val_tf = eval_transform(input_size, margin)
    train = KeypointDataset(train_records, base, cfg.seed, names, per_source)
    val = KeypointDataset(val_records, val_tf, cfg.seed, names)
    return train, val


# ---- one run: records, the network, loaders, resumable state, epoch bookkeeping ---------------------

def split_records(train_sources: Sequence[DataSource], val_sources: Sequence[DataSource],
                  val_fraction: float) -> tuple[list[Record], list[Record]]:
    """(training, validation) records: each training source split by identity, validation-only sources whole."""
    train_records, val_records = [], []
    for src in train_sources:
        tr, va = split_by_identity(src.read("training"), val_fraction)
        train_records += tr
        val_records += va
    for src in val_sources:
        val_records += src.read("training") if src.kind == "course" else src.read()
    return train_records, val_records


def check_split(src: DataSource, records: Sequence[Record], val_fraction: float) -> None:
    """DatasetError when ``val_fraction`` leaves a training source without identities on either side of its split."""
    fit, held = split_by_identity(records, val_fraction)
    if not fit or not held:
        people = len({r.person for r in records})
        raise DatasetError(
            f"{src.label}: --val-fraction {val_fraction} leaves {'no' if not held else 'only'} validation "
            f"identities among its {people} people: raise --val-fraction or add data"
        )


def initial_model(cfg: TrainConfig, log: logging.Logger | None = None, shapes: np.ndarray | None = None) -> nn.Module:
    """The network a run starts from: a release model's (``init``), or the preset's, with ImageNet weights
    (``pretrained``), an error head (``point_sigma``), a pip read-out (``head``, its neighbours from the mean of the
    training ``shapes``, N x 68 x 2) and frozen early layers (``freeze_stride``) as configured; ``log`` hears what
    was done."""
    from fkp_core.model import build_model
    from fkp_core.weights import load_model

    if cfg.init:
        model = load_model(cfg.init).model.train()
        if cfg.upright:
            model.config = replace(model.config, upright=True)
        if cfg.prune < 1:
            from fkp_core.pruning import prune

            model = prune(model, cfg.prune, cfg.prune_stride)
            if log is not None:
                log.info("%s pruned to hidden widths %s", cfg.init, list(model.config.backbone_hidden))
        return _frozen(_grown(_resized(model, cfg.input_size, cfg.init), cfg, cfg.init, shapes), cfg, log)
    overrides = {"input_size": cfg.input_size} if cfg.input_size else {}
    if cfg.head in PIP_HEADS:
        overrides.update(head=cfg.head, pip_neighbours=neighbours_of(shapes))
    if cfg.point_sigma:
        overrides["point_sigma"] = True
    if cfg.upright:
        overrides["upright"] = True
    if cfg.head_expand:
        overrides["head_expand"] = cfg.head_expand
    if cfg.context:
        overrides["context"] = True
    preset = build_model(cfg.model, **overrides)
    if cfg.pretrained:
        unused = preset.load_pretrained()
        if log is not None:
            log.info("backbone %s initialised from ImageNet weights (%d tensors of the file beyond the cut unused)",
                     preset.config.backbone, len(unused))
    return _frozen(preset, cfg, log)


# config field -> its new weights' prefixes
_GROWN_PARTS = {"point_sigma": ("head.sigma.",), "head_expand": ("head.expand.",), "head": ("head.cells.", "head.offset.", "head.nb."),
                "pip_neighbours": (), "context": ("head.context.", "backbone.")}


def _grown(model: nn.Module, cfg: TrainConfig, name: str, shapes: np.ndarray | None = None) -> nn.Module:
    """A release model with the parts the run adds to it (an error head, a wider heatmap read-out, a pip read-out, the
    backbone's next stride as context), its trained weights kept and the new parts at their initialisation (the pip
    read-out's at its cells' centres: its heatmaps read at their peak; the context's layers at their ImageNet
    weights)."""
    from fkp_core.model import build_model

    grow: dict[str, object] = {}
    if cfg.head in PIP_HEADS and model.config.head != cfg.head:
        if model.config.head != "heatmap":
            raise ValueError(f"{name}: a {cfg.head} read-out goes on a heatmap head, not {model.config.head!r}")
        grow.update(head=cfg.head, pip_neighbours=neighbours_of(shapes))
    if cfg.point_sigma and not model.config.point_sigma:
        grow["point_sigma"] = True
    if cfg.head_expand and model.config.head_expand != cfg.head_expand:
        if model.config.head_expand:
            raise ValueError(f"{name} already has a heatmap read-out of width {model.config.head_expand}")
        grow["head_expand"] = cfg.head_expand
    if cfg.context and not model.config.context:
        grow["context"] = True
    if not grow:
        return model
    fresh = build_model(model.config, **grow)
    if "context" in grow:  # every layer from ImageNet first; the trained ones are loaded over theirs below
        fresh.load_pretrained()
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    new = tuple(prefix for key in grow for prefix in _GROWN_PARTS[key])
    if unexpected or any(not k.startswith(new) for k in missing):
        raise ValueError(f"cannot add {' and '.join(grow)} to {name}: {missing + unexpected}")
    if "head" in grow:  # the cells start as the heatmaps
        fresh.head.cells.load_state_dict(fresh.head.out.state_dict())
    return fresh.train()


def _resized(model: nn.Module, input_size: int | None, name: str) -> nn.Module:
    """A release model at another input size, every weight kept: a backbone with a heatmap head is convolutional
    throughout (its soft-argmax grid follows the size), so it can be fine-tuned on larger or smaller crops."""
    from fkp_core.model import build_model

    if not input_size or input_size == model.config.input_size:
        return model
    if model.config.backbone == "resnet":
        raise ValueError(f"{name}: only a model with a pretrained backbone (mnv2, lite0) can change its input size")
    resized = build_model(model.config, input_size=input_size)
    resized.load_state_dict(model.state_dict())
    return resized.train()


def _frozen(model: nn.Module, cfg: TrainConfig, log: logging.Logger | None) -> nn.Module:
    if cfg.freeze_stride:
        frozen = model.backbone.freeze(cfg.freeze_stride)
        if log is not None:
            log.info("backbone layers up to stride %d frozen (%d parameters)", cfg.freeze_stride, frozen)
    return model


def make_loaders(train_ds: Dataset, val_ds: Dataset, sampler: Sampler, batch_size: int, loader_workers: int,
                 device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The training loader (whole batches drawn by ``sampler``) and the validation loader (in order)."""
    common = dict(num_workers=loader_workers, persistent_workers=loader_workers > 0, pin_memory=device.type == "cuda",
                  worker_init_fn=loader_worker_init if loader_workers > 0 else None)
    train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_ds, batch_size=256, shuffle=False, **common)
    return train_loader, val_loader


def load_teacher(path: str, device: torch.device, mirror: bool = False) -> Teacher:
    """A distillation teacher from a release model; with ``mirror``, one that teaches its mirrored pass (the model
    must carry a fitted ``"mirror_offset"``)."""
    from fkp_core.weights import load_model

    loaded = load_model(path, device=str(device))
    if mirror and loaded.fit.mirror_offset is None:
        raise ValueError(f"{path}: no fitted mirror offset, so no mirrored pass to teach (jobs.evaluate --fit-mirror)")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, loaded.fit.mirror_offset if mirror else None)


def epoch_metrics(epoch: int, stats: dict, per_source: dict[str, float], train_names: Sequence[str], workers: int,
                  lr: float) -> dict:
    """What an epoch reports: loss, speed over all workers, learning rate, per-source validation NME and
    :data:`SELECTION_METRIC`, their mean over the training sources."""
    selection = float(np.mean([per_source[n] for n in train_names if n in per_source])) if per_source else float("nan")
    return {
        "epoch": epoch,
        "loss": stats["loss"],
        "images_per_s": stats["images_per_s"] * workers,
        "lr": lr,
        SELECTION_METRIC: selection,
        **{f"val_nme/{k}": v for k, v in per_source.items()},
    }


def best_record(metrics: dict) -> dict:
    """The part of an epoch's metrics kept as the best epoch: its number and its validation NMEs."""
    return {k: v for k, v in metrics.items() if k in ("epoch", SELECTION_METRIC) or k.startswith("val_nme/")}


def cpu_state(model: nn.Module) -> dict:
    """A detached CPU copy of the model's weights (the best epoch's, kept while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
