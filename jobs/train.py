"""Train the keypoint CNN on Ray Train workers and export the best epoch as a release model.

    python -m jobs.train --data course:data/fkp --data ibug:data/300w/helen --val-data ibug:data/300w/afw

Every epoch each worker trains on its shard of a weighted draw over the data sources, all ranks
report validation NME (identity-disjoint split of each training source, plus any ``--val-data``
source, which is never trained on), and rank 0 attaches a checkpoint holding the latest state
and the best weights so far. Re-running the same command (same ``--storage`` and ``--name``)
resumes from the last checkpoint. The best epoch (lowest NME on the training sources' validation
splits) is written to ``--output`` as ``NAME.pt`` + ``NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fkp_core.constants import SELECTION_METRIC, THREE_QUARTER_MAX_YAW
from jobs.common import EXIT_FAILED, EXIT_OK, Parser, UsageError, add_common_flags, init_ray, load_model_arg, run_main, use_gpus
from jobs.train_data import PUBLIC_ARCHIVE_URL, resolve_sources

log = logging.getLogger("fkp.train")

def build_parser() -> argparse.ArgumentParser:
    from fkp_core.model import MODEL_PRESETS
    from fkp_core.training import LOSSES, TrainConfig
    from fkp_core.transforms import AugmentConfig
    from jobs.common import (Ranged, fraction, non_negative_float, non_negative_int, positive_float, positive_int, share,
                             unit_interval)

    d, a = TrainConfig(), AugmentConfig()
    p = Parser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        metavar="[KIND:]PATH[@WEIGHT]",
        help="training source, repeatable: KIND is 'course' (Udacity CSV layout) or 'ibug' (.pts folder), "
        "detected from the folder when omitted; WEIGHT is its share of each epoch (default 1). "
        "Default: $FKP_DATA/fkp, else ./data",
    )
    g.add_argument(
        "--val-data",
        action="append",
        default=[],
        metavar="[KIND:]PATH",
        help="validation-only source, repeatable (reported every epoch, never trained on; e.g. AFW)",
    )
    g.add_argument("--val-fraction", type=fraction, default=d.val_fraction, help="identities held out of each training source for validation")
    g.add_argument("--download", action="store_true", help="fetch and unpack the public course archive into the data dir first (when it is not there)")
    g.add_argument("--download-url", default=PUBLIC_ARCHIVE_URL, help="archive to fetch with --download (http(s):// or file://)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=None, choices=sorted(MODEL_PRESETS), help=f"network preset (fkp_core.model.MODEL_PRESETS; default: {d.model})")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="crop side in pixels (default: the preset's, or the --init model's; an --init model with a "
                        "pretrained backbone can be fine-tuned at another size)")
    g.add_argument("--init", default=None, metavar="MODEL",
                   help="start from the weights of a release model (NAME.pt with NAME.json beside it, or a bundled one by "
                        "name: 'bundled' or 'default', 'hm', 'fast', 'fastest'), to fine-tune it on more data; its architecture replaces --model (and --input-size, unless given) "
                        "(default: random initialisation)")
    g.add_argument("--distill", default=None, metavar="MODEL",
                   help="knowledge distillation: a release model (path, or 'bundled'/'default', 'hm', 'fast', 'fastest') whose predictions on the same "
                        "augmented crops the network also learns; it must crop with the same margin, and sees the crops "
                        "resampled to its own input size (default: off)")
    g.add_argument("--distill-weight", type=share, default=d.distill_weight,
                   help="share of the loss given to the --distill teacher's predictions (the rest to the labels)")
    g.add_argument("--distill-mirror", action="store_true",
                   help="the --distill teacher teaches its mirrored pass: its points averaged over each crop and the crop's "
                        "mirror image, as the job runs it (the teacher needs a fitted mirror offset)")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the (weighted) training set")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per step per worker")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay, help="AdamW weight decay (not on norms/biases)")
    g.add_argument("--schedule", default=d.schedule, choices=["cosine", "step", "constant"], help="learning-rate schedule after warm-up")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=d.warmup_epochs, help="linear warm-up length")
    g.add_argument("--loss", default=d.loss, choices=sorted(LOSSES), help="regression loss on [-1, 1] crop coordinates")
    g.add_argument("--rotation", type=Ranged(float, 0, 180), default=a.rotation, help="max in-plane rotation of training crops, degrees")
    g.add_argument("--occlusion", type=unit_interval, default=a.occlusion, help="probability of a random occluding rectangle")
    g.add_argument("--flip", type=unit_interval, default=a.flip, help="probability of a horizontal flip (points relabelled by the iBUG permutation)")
    g.add_argument("--no-photometric", action="store_true", help="turn off brightness/contrast/blur/noise augmentation")
    g.add_argument("--occluders", type=unit_interval, default=d.occluders,
                   help="probability of an object (rectangle, ellipse, hand-like blob) over the mouth or eyes")
    g.add_argument("--three-quarter", type=unit_interval, default=d.three_quarter,
                   help=f"probability of a synthetic three-quarter view: the face turned by up to {THREE_QUARTER_MAX_YAW:g} degrees about its "
                        "vertical axis on a head-shaped depth map, the labels moved with it")
    g.add_argument("--low-light", type=unit_interval, default=d.low_light, help="probability of a dim, noisy crop (gain, gamma, sensor noise)")
    g.add_argument("--motion-blur", type=unit_interval, default=d.motion_blur, help="probability of a directional blur")
    g.add_argument("--jpeg", type=unit_interval, default=d.jpeg, help="probability of a JPEG round trip at quality 10-70")
    g.add_argument("--point-sigma", action="store_true",
                   help="learn keypoint scores: add an error head to the heatmap head (kept by --init models that have "
                        "one) and fit it to the points' errors; without it, scores come from each heatmap's spread")
    g.add_argument("--nonface", type=unit_interval, default=d.nonface,
                   help="share of training crops moved off the face or blanked, whose points the error head learns to "
                        "score as lost (needs an error head)")
    g.add_argument("--freeze-stride", type=int, choices=[0, 2, 4, 8, 16, 32], default=d.freeze_stride,
                   help="keep the backbone's layers up to this output stride at their initial weights (ImageNet's, or the "
                        "--init model's), batch norms included: a cheaper backward pass on CPUs (0: train everything; at or "
                        "above the backbone's cut, 16 for mnv2 and lite0, only the head trains; mnv2/lite0 only)")
    g.add_argument("--prune", type=Ranged(float, 0, 1, low_open=True, high_open=True), default=None, metavar="KEEP",
                   help="with an --init model with a MobileNetV2 backbone: keep this share of the hidden channels of its blocks "
                        "up to --prune-stride, those with the most weight (fkp_core.pruning), a cheaper network to fine-tune, "
                        "best taught by the --init model itself (--distill) (default: off)")
    g.add_argument("--prune-stride", type=int, choices=[2, 4, 8, 16], default=d.prune_stride,
                   help="with --prune: the output stride up to which blocks are pruned (the high-resolution blocks cost most)")
    g.add_argument("--mirror-course", action="store_true",
                   help="flip course crops too (--flip), with their labels' offset kept; by default only the 300-W sources "
                        "are flipped")
    g.add_argument("--head-expand", type=non_negative_int, default=0, metavar="C",
                   help="widen the heatmap read-out with a hidden 1x1 layer of C channels beside it (0: none); added to an "
                        "--init model at zero, so training starts from its predictions")
    g.add_argument("--head", choices=["pip", "dual"], default=None,
                   help="pip: a pixel-in-pixel read-out (PIPNet): each point read at the peak of a map of cells with a learned "
                        "offset, and placed by its nearest neighbours on the mean face too, instead of a heatmap's mean "
                        "(soft-argmax); dual: the mean of both read-outs of one decoder. Added to an --init model's heatmap "
                        "head, whose decoder (and heatmaps) it keeps (default: the model's own head)")
    g.add_argument("--context", action="store_true",
                   help="run the pretrained backbone one stride further (to 32 for mnv2 and lite0) and add a 1x1 convolution "
                        "of those deepest features to the heatmap decoder: the whole face in view at every point. Grown onto "
                        "an --init model (its new layers from ImageNet, the 1x1 at zero), training starts from its predictions")
    g.add_argument("--pose-balance", type=Ranged(float, 0, 100), default=d.pose_balance, metavar="S",
                   help="draw faces turned left or right more often: up to 1 + S times a frontal face of the same source "
                        "(by the nose tip's place between the jaw's ends), each source keeping its share (0: off)")
    g.add_argument("--ema", type=Ranged(float, 0, 1, high_open=True), default=d.ema, metavar="DECAY",
                   help="keep an exponential moving average of the weights (decay per step, e.g. 0.995: about the last 200 "
                        "steps) and validate, keep and export it instead of the last step's weights (0: off)")
    g.add_argument("--upright", action="store_true",
                   help="train on upright crops (eyes level, turned by up to --rotation degrees), the view the annotator "
                        "gives every model; the ImageNet presets always train so (with --init: from now on)")
    g.add_argument("--pretrained", action="store_true",
                   help="initialise the backbone of --model (mnv2, lite0) from its ImageNet weights; needs the 'train' extra "
                        "(pip install -e '.[train]'); inference never does")
    g.add_argument("--seed", type=non_negative_int, default=d.seed, help="seeds initialisation, sampling and augmentation")
    g = p.add_argument_group("workers")
    g.add_argument("--num-workers", type=positive_int, default=None, help="Ray Train workers (default: one per GPU, else one per --cpus-per-worker CPUs of the cluster)")
    g.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs reserved per worker (torch threads = max(1, floor))")
    g.add_argument("--loader-workers", type=non_negative_int, default=None, help="data-loading processes per worker (default: CPUs per worker - 1)")
    g.add_argument("--gpus-per-worker", type=positive_float, default=1.0, help="GPU share per worker when training on GPUs (below 1 lets several runs share a GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: GPUs when the cluster has them")
    g.add_argument("--max-failures", type=Ranged(int, -1, note="-1: no limit"), default=2, help="times a failed worker group is restarted from the last checkpoint")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="runs/model", help="where the release model (NAME.pt + NAME.json) is written")
    g.add_argument("--name", default="fkp", help="run name: the model's file name and the checkpoint folder under --storage")
    g.add_argument("--storage", default=None, help="checkpoint root, an absolute path or URI (shared storage on a multi-node cluster); default: OUTPUT/checkpoints")
    g.add_argument("--export-checkpoint", action="store_true",
                   help="do not train: write the best epoch so far of the newest local checkpoint under --storage/--name as the "
                        "release model in --output (a run that was stopped, or is still running)")
    add_common_flags(p)
    return p


# ------------------------------------------------------------------------------------------
# the per-worker loop (runs inside Ray Train workers)
# ------------------------------------------------------------------------------------------


def _source_dicts(sources) -> list[dict]:
    return [{"kind": s.kind, "path": str(s.path.resolve()), "weight": s.weight, "name": s.label} for s in sources]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of every epoch, validation, and (rank 0) the checkpoint."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from fkp_core.training import (
        TrainConfig,
        WeightedDistributedSampler,
        best_record,
        cpu_state,
        epoch_metrics,
        initial_model,
        load_teacher,
        make_datasets,
        make_loaders,
        make_optimizer,
        pose_balanced,
        source_weights,
        split_records,
        train_epoch,
        validation_nme,
        weight_average,
    )

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    wlog = logging.getLogger("fkp.train.worker")
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)

    train_sources, val_sources = _sources(config["sources"]), _sources(config["val_sources"])
    train_records, val_records = split_records(train_sources, val_sources, cfg.val_fraction)
    shapes = np.stack([r.keypoints for r in train_records]) if cfg.head else None  # a pip read-out's mean face
    preset = initial_model(cfg, wlog if rank == 0 else None, shapes)
    mcfg = preset.config
    # 300-W labels are mirror-symmetric (once their offset is kept); the course's only roughly, so flipped on request
    mirror = {s.label: s.label_x_offset for s in train_sources if s.kind == "ibug" or cfg.mirror_course}
    train_ds, val_ds = make_datasets(train_records, val_records, cfg, mcfg.input_size, mcfg.crop_margin, mcfg.upright, mirror)
    weights = pose_balanced(source_weights(train_records, {s.label: s.weight for s in train_sources}), train_records, cfg.pose_balance)
    sampler = WeightedDistributedSampler(weights, len(train_records), rank, world, cfg.seed)
    train_loader, val_loader = make_loaders(train_ds, val_ds, sampler, cfg.batch_size, config["loader_workers"], device)

    teacher = load_teacher(cfg.distill, device, cfg.distill_mirror) if cfg.distill else None
    model = ray.train.torch.prepare_model(preset)  # moves to the worker's device, wraps in DDP when world > 1
    core = model.module if hasattr(model, "module") else model
    optimizer, scheduler = make_optimizer(model, cfg, len(train_loader))
    ema = weight_average(core, cfg.ema) if cfg.ema else None
    evaluated = ema.module if ema is not None else core  # the weights validated, kept as the best and exported
    start_epoch, best, best_state = _resume(config, core, optimizer, scheduler, device, wlog if rank == 0 else None, ema)

    train_names = [s.label for s in train_sources]
    counts = {"train": len(train_records), "val": len(val_records)}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        stats = train_epoch(model, train_loader, optimizer, scheduler, cfg.loss, device, teacher, cfg.distill_weight,
                            core.config.point_sigma, ema)
        per_source = validation_nme(evaluated, val_loader, device, val_ds.sources)
        metrics = epoch_metrics(epoch, stats, per_source, train_names, world, scheduler.get_last_lr()[0])
        improved = metrics[SELECTION_METRIC] < best[SELECTION_METRIC]
        if improved:
            best, best_state = best_record(metrics), cpu_state(evaluated)
        if rank == 0:
            wlog.info(
                "epoch %d/%d  loss %.4f  val NME %s  %s%.0f img/s",
                epoch + 1, cfg.epochs, stats["loss"],
                " ".join(f"{k}={v:.4f}" for k, v in per_source.items()), "(best) " if improved else "", metrics["images_per_s"],
            )
            progress = {"epoch": epoch, "best": best, "train": config["train"], "model_config": core.config.to_dict(),
                        "counts": counts}
            _report_with_checkpoint(metrics, core, optimizer, scheduler, best_state, progress, ema)
        else:
            ray.train.report(metrics)


def _sources(dicts: list[dict]) -> list:
    from fkp_core.dataset import DataSource

    return [DataSource(**{**s, "path": Path(s["path"])}) for s in dicts]


def _resume(config: dict[str, Any], core, optimizer, scheduler, device, wlog: logging.Logger | None,
            ema=None) -> tuple[int, dict, dict | None]:
    """(first epoch, best epoch so far, its weights): from the run's last checkpoint, else a fresh start."""
    import ray.train

    from fkp_core.checkpoints import load_state

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, {"epoch": -1, SELECTION_METRIC: float("inf")}, None
    with checkpoint.as_directory() as ckdir:
        best_state, meta = load_state(Path(ckdir), core, optimizer, scheduler, device, ema)
    if meta["train"] != json.loads(json.dumps(config["train"])):
        raise RuntimeError("the checkpoint under this --storage/--name was made with other settings: use another --name")
    if wlog is not None:
        wlog.info("resuming from epoch %d (best so far: epoch %d, val NME %.4f)", meta["epoch"] + 1, meta["best"]["epoch"],
                  meta["best"][SELECTION_METRIC])
    return meta["epoch"] + 1, meta["best"], best_state


def _report_with_checkpoint(metrics: dict, core, optimizer, scheduler, best_state: dict | None, progress: dict,
                            ema=None) -> None:
    import ray.train

    from fkp_core.checkpoints import save_state

    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp), core, optimizer, scheduler, best_state, progress, ema)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _worker_plan(args: argparse.Namespace, mode: str) -> tuple[int, bool]:
    resources, use_gpu = use_gpus(args.device, mode)
    if args.num_workers is not None:
        return args.num_workers, use_gpu
    if use_gpu:
        return max(1, int(resources.get("GPU", 0) // args.gpus_per_worker)), True
    return max(1, int(resources.get("CPU", 1) // args.cpus_per_worker)), False


def _resolve_init(args: argparse.Namespace) -> tuple[str | None, dict | None]:
    """``--init`` as an absolute model path (checked loadable here, not in a worker), and its metadata."""
    if args.init is None:
        return None, None
    if args.model is not None:
        raise UsageError("--init takes the architecture from the model file: leave out --model")
    path = _release_model_path(args.init)
    meta = load_model_arg(path, flag="--init").metadata
    if args.input_size is not None:
        from fkp_core.model import ModelConfig

        try:
            ModelConfig.from_dict({**meta["config"], "input_size": args.input_size})
        except ValueError as exc:
            raise UsageError(f"--input-size {args.input_size} does not fit the --init model: {exc}") from None
        if meta["config"].get("backbone", "resnet") == "resnet":
            raise UsageError("--input-size with --init needs a model with a pretrained backbone (mnv2, lite0): "
                             "the others' dense layers are sized for their crops")
    return str(path), meta


def _check_pretrained(args: argparse.Namespace, parent: dict | None) -> None:
    """``--pretrained`` / ``--prune`` / ``--freeze-stride`` / ``--point-sigma`` / ``--nonface`` / ``--head`` / ``--head-expand`` / ``--context``: a model that has
    what they act on, its ImageNet weights installed (checked here, not in a worker)."""
    from fkp_core.model import HEATMAP_HEADS, MODEL_PRESETS
    from fkp_core.training import TrainConfig

    name = args.model or TrainConfig.model
    backbone = parent["config"].get("backbone", "resnet") if parent else MODEL_PRESETS[name].backbone
    if args.prune is not None and (parent is None or backbone != "mobilenet_v2"):
        raise UsageError("--prune narrows an --init model with a MobileNetV2 backbone (mnv2)")
    if args.freeze_stride and backbone == "resnet":
        raise UsageError("--freeze-stride needs a model with a backbone (mnv2, lite0)")
    head = parent["config"].get("head", "fc") if parent else MODEL_PRESETS[name].head
    sigma = args.point_sigma or bool(parent and parent["config"].get("point_sigma"))
    if args.point_sigma and head not in HEATMAP_HEADS:
        raise UsageError(f"--point-sigma needs a heatmap head (model {name!r} has {head!r})")
    if args.nonface and not sigma:
        raise UsageError("--nonface teaches the error head: add --point-sigma")
    if args.head and head not in ("heatmap", args.head):
        raise UsageError(f"--head {args.head} reads a heatmap head (model {name!r} has {head!r})")
    if args.head_expand and head != "heatmap":
        raise UsageError(f"--head-expand widens a heatmap head (model {name!r} has {head!r})")
    had = parent["config"].get("head_expand", 0) if parent else 0
    if args.head_expand and had and had != args.head_expand:
        raise UsageError(f"--head-expand: the --init model already has a read-out of width {had}")
    if args.context:
        _check_context(backbone, parent)
    if not args.pretrained:
        return
    if parent is not None:
        raise UsageError("--pretrained starts from ImageNet weights and --init from a release model: give one of them")
    if backbone == "resnet":
        raise UsageError(f"--pretrained: model {name!r} has no pretrained backbone (use mnv2 or lite0)")
    _require_imagenet(backbone, "--pretrained")


def _require_imagenet(backbone: str, flag: str) -> None:
    """The backbone's ImageNet weights installed (the 'train' extra), else a usage error led by ``flag``."""
    from fkp_core.backbones import PretrainedError, pretrained_path

    try:
        pretrained_path(backbone)
    except PretrainedError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _check_context(backbone: str, parent: dict | None) -> None:
    """``--context``: a pretrained backbone cut at stride 16 or less, and the ImageNet weights of the layers it adds to
    an --init model installed."""
    if backbone == "resnet":
        raise UsageError("--context needs a model with a pretrained backbone (mnv2, lite0)")
    if parent is None or parent["config"].get("context"):
        return
    if parent["config"].get("backbone_stride", 16) > 16:
        raise UsageError("--context: the --init model's backbone already runs to stride 32")
    _require_imagenet(backbone, "--context grows the --init model's backbone from its ImageNet weights")


def _release_model_path(value: str) -> Path:
    """A model named by --init or --distill: 'bundled' (the default), another bundled name, or a path."""
    from fkp_core.weights import resolve_model_path

    return resolve_model_path(None if value == "bundled" else value)


def _resolve_distill(args: argparse.Namespace, parent: dict | None) -> tuple[str | None, dict | None]:
    """``--distill`` as an absolute model path and its metadata, checked to see the crops the student sees."""
    if args.distill is None:
        if args.distill_mirror:
            raise UsageError("--distill-mirror needs --distill")
        return None, None
    if not 0 < args.distill_weight <= 1:
        raise UsageError("--distill-weight must be in (0, 1]")
    from fkp_core.model import MODEL_PRESETS
    from fkp_core.training import TrainConfig

    path = _release_model_path(args.distill)
    teacher = load_model_arg(path, flag="--distill")
    margin = parent["config"]["crop_margin"] if parent else MODEL_PRESETS[args.model or TrainConfig.model].crop_margin
    if teacher.model.config.crop_margin != margin:  # another input size is resampled (training.teacher_view)
        raise UsageError(f"--distill: the teacher's crops have margin {teacher.model.config.crop_margin} and the "
                         f"network's {margin}; they must see the same crops")
    if args.distill_mirror and teacher.fit.mirror_offset is None:
        raise UsageError(f"--distill-mirror: {path} has no fitted mirror offset (jobs.evaluate --fit-mirror)")
    return str(path), teacher.metadata


def export_checkpoint(args: argparse.Namespace) -> int:
    """``--export-checkpoint``: the release model from a run's newest checkpoint, without training."""
    from fkp_core.checkpoints import export_release, newest_checkpoint

    output = Path(args.output)
    storage = Path(args.storage) if args.storage else (output / "checkpoints").resolve()
    if "://" in str(args.storage or "") or "://" in args.output:
        raise UsageError("--export-checkpoint works on local --storage and --output folders")
    ckdir = newest_checkpoint(storage, args.name)
    if ckdir is None:
        raise UsageError(f"--export-checkpoint: no checkpoint of run {args.name!r} under {storage}")
    with tempfile.TemporaryDirectory() as tmp:  # a still-running run may replace the folder while we read it
        copy = Path(tmp) / "checkpoint"
        shutil.copytree(ckdir, copy)
        progress = json.loads((copy / "progress.json").read_text())
        extra = {"command": args.command, "exported_from": str(ckdir),
                 "note": f"exported by --export-checkpoint after epoch {progress['epoch'] + 1} of {progress['train']['epochs']}",
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = export_release(copy, output, args.name, extra)
    meta = json.loads(path.with_suffix(".json").read_text())
    best = meta["metrics"]["validation"]
    log.info("best epoch %d of %d: %s", meta["trained"]["best_epoch"], meta["trained"]["epochs_run"],
             ", ".join(f"{k}={v:.4f}" for k, v in best.items()))
    print(f"model written to {path} (+ {path.with_suffix('.json').name})")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.export_checkpoint:
        return export_checkpoint(args)
    _check_args(args)
    init, parent = _resolve_init(args)
    _check_pretrained(args, parent)
    distill, teacher_meta = _resolve_distill(args, parent)
    train_sources, val_sources = resolve_sources(args)
    remote_output, output, storage = _prepare_output(args)
    cfg = _train_config(args, init, distill, parent)
    import ray
    import ray.train

    mode = init_ray()
    num_workers, use_gpu = _worker_plan(args, mode)
    log.info("training %s on %d %s worker(s) (%s Ray), checkpoints in %s/%s", init or cfg.model, num_workers,
             "GPU" if use_gpu else "CPU", mode, storage, args.name)
    trainer = _trainer(args, cfg, train_sources, val_sources, storage, num_workers, use_gpu)
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        log.error("training failed: %s", exc)
        return EXIT_FAILED
    if result.checkpoint is None:
        log.error("training produced no checkpoint")
        return EXIT_FAILED
    extra = _release_extra(args, train_sources, val_sources, num_workers, use_gpu, started)
    if parent:
        extra["init"] = {"path": init, "sha256": parent.get("sha256"), "trained": parent.get("trained", {})}
    if teacher_meta:
        extra["distill"] = {"path": distill, "sha256": teacher_meta.get("sha256"), "weight": args.distill_weight,
                            "mirror_offset": teacher_meta.get("mirror_offset") if args.distill_mirror else None,
                            "teacher_validation": teacher_meta.get("metrics", {}).get("validation")}
    from fkp_core.checkpoints import export_release

    with tempfile.TemporaryDirectory() as tmp, result.checkpoint.as_directory() as ckdir:
        path = export_release(Path(ckdir), Path(tmp) if remote_output else output, args.name, extra)
        meta = json.loads(path.with_suffix(".json").read_text())
        if remote_output:
            path = _upload(args.output, path)
    best = meta["metrics"]["validation"]
    log.info("best epoch %d: %s", meta["trained"]["best_epoch"], ", ".join(f"{k}={v:.4f}" for k, v in best.items()))
    print(f"model written to {path} (+ {path.with_suffix('.json').name})")
    return EXIT_OK


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
    if not 0 < args.val_fraction < 1:
        raise UsageError("--val-fraction must be in (0, 1)")
    if args.cpus_per_worker <= 0:
        raise UsageError("--cpus-per-worker must be > 0")
    if args.storage and "://" not in args.storage and not os.path.isabs(args.storage):
        raise UsageError("--storage must be an absolute path or a URI (Ray Train requires it)")


def _prepare_output(args: argparse.Namespace) -> tuple[bool, Path | None, str]:
    """(whether --output is a URI, the local output folder (made here), the checkpoint storage)."""
    if "://" in args.output:  # e.g. s3://bucket/models: written locally, then uploaded
        from fkp_core.store import open_output

        try:
            open_output(args.output)
        except ValueError as exc:
            raise UsageError(f"--output: {exc}") from None
        return True, None, args.storage or args.output.rstrip("/") + "/checkpoints"
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {output}: {exc.strerror}") from None
    return False, output, args.storage or str((output / "checkpoints").resolve())


def _train_config(args: argparse.Namespace, init: str | None, distill: str | None, parent: dict | None):
    from fkp_core.training import TrainConfig
    from fkp_core.transforms import AugmentConfig

    parent_trained = parent.get("trained", {}) if parent else {}
    return TrainConfig(
        model=parent_trained.get("train_config", {}).get("model", "custom") if parent else (args.model or TrainConfig.model),
        input_size=args.input_size, init=init, distill=distill, distill_weight=args.distill_weight, distill_mirror=args.distill_mirror,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs, loss=args.loss,
        val_fraction=args.val_fraction, seed=args.seed,
        loader_workers=args.loader_workers if args.loader_workers is not None else max(0, int(args.cpus_per_worker) - 1),
        pretrained=args.pretrained, freeze_stride=args.freeze_stride,
        prune=args.prune if args.prune is not None else TrainConfig.prune, prune_stride=args.prune_stride, occluders=args.occluders, low_light=args.low_light, motion_blur=args.motion_blur, jpeg=args.jpeg,
        three_quarter=args.three_quarter,
        point_sigma=args.point_sigma, nonface=args.nonface, upright=args.upright, mirror_course=args.mirror_course, head_expand=args.head_expand, head=args.head,
        context=args.context,
        ema=args.ema, pose_balance=args.pose_balance,
        augment=replace(AugmentConfig(), rotation=args.rotation, occlusion=args.occlusion, flip=args.flip, photometric=not args.no_photometric),
    )


def _trainer(args: argparse.Namespace, cfg, train_sources, val_sources, storage: str, num_workers: int, use_gpu: bool):
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(), "threads": args.cpus_per_worker, "loader_workers": cfg.loader_workers,
            "sources": _source_dicts(train_sources), "val_sources": _source_dicts(val_sources),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if use_gpu else {})}
        ),
        run_config=ray.train.RunConfig(
            name=args.name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
        ),
    )


def _release_extra(args: argparse.Namespace, train_sources, val_sources, num_workers: int, use_gpu: bool,
                   started: float) -> dict[str, Any]:
    """The release model's ``trained`` metadata: the command, data, workers and software of the run."""
    import ray
    import torch

    return {
        "command": args.command,
        "sources": _source_dicts(train_sources),
        "val_sources": _source_dicts(val_sources),
        "workers": num_workers,
        "device": "cuda" if use_gpu else "cpu",
        "gpu": torch.cuda.get_device_name(0) if use_gpu and torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds_this_session": round(time.time() - started, 1),
    }


def _upload(output: str, path: Path) -> Path:
    """Copy the release model's two files to a URI ``--output``; the name to show for it."""
    from fkp_core.store import open_output

    dest = open_output(output)
    for local in (path, path.with_suffix(".json")):
        dest.write_bytes(dest.path(local.name), local.read_bytes())
    return Path(output.rstrip("/")) / path.name  # for the message only


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.train", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
