"""The keypoint CNN: a small residual network that regresses 68 (x, y) pairs from a gray face crop.

Plain 3x3 convolutions (fast on CPU through oneDNN, where depthwise layers are not), a strided
stem, residual stages that halve the resolution, and a fully connected head over the last
feature map, which keeps where on the face each feature was (global pooling would throw that
away). Sized by :class:`ModelConfig`; ``MODEL_PRESETS`` names the configurations we train.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from fkp_core.constants import NUM_KEYPOINTS, POINT_SIGMA_INIT
from fkp_core.transforms import CROP_MARGIN

HEATMAP_HEADS = ("heatmap", "pip", "dual")  # heads that read points from per-point heatmaps (and so give keypoint scores)
PIP_HEADS = ("pip", "dual")  # heads with a pixel-in-pixel read-out (fkp_core.pip_head)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and the input it expects (crop size and margin, pixel normalisation)."""

    input_size: int = 96
    crop_margin: float = CROP_MARGIN
    input_mean: float = 0.5
    input_std: float = 0.25
    stem: int = 32
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 2, 2, 1)
    head: str = "fc"  # fc: dense layers over the last map | heatmap: per-point heatmaps + soft-argmax | pip: heatmaps
    # read at their peak with offsets and neighbours' votes (fkp_core.pip_head) | dual: the mean of the two read-outs
    head_hidden: int = 256  # fc: hidden units; heatmap: decoder channels
    heatmap_stride: int = 4  # heatmap: input pixels per heatmap cell
    dropout: float = 0.1
    # resnet: the plain residual stages above | mobilenet_v2, efficientnet_lite0: ImageNet-pretrainable
    # backbones (fkp_core.backbones), cut at backbone_stride; widths/depths/stem then unused
    backbone: str = "resnet"
    backbone_stride: int = 16
    # pretrained backbones only: the backbone runs one stride further (to 2 x backbone_stride) and a 1x1 convolution
    # of those deepest features, zero-initialised, is added to the decoder's top level: the whole face in view at
    # every point, and a trained model can grow it without its output changing
    context: bool = False
    # mobilenet_v2 only: each block's hidden channels (a pruned network, fkp_core.pruning); empty: the stock widths
    backbone_hidden: tuple[int, ...] = ()
    upright: bool = False  # trained on crops turned so the eye line is level (transforms.face_frame)
    # heatmap: keypoint scores from a learned per-point error (a 1x1 convolution on the decoder's features,
    # read under each point's heatmap, trained on the positions' detached errors) instead of the heatmap's spread
    point_sigma: bool = False
    # heatmap: hidden channels of a 1x1 -> ReLU -> 1x1 branch beside the 1x1 that reads the heatmaps from the
    # decoder's features (0: none); zero-initialised, so it can be added to a trained model without changing it
    head_expand: int = 0
    # pip: each point's neighbours on the mean face, K per point, flattened (fkp_core.pip_head.neighbour_table)
    pip_neighbours: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.point_sigma and self.head not in HEATMAP_HEADS:
            raise ValueError("point_sigma needs a heatmap head")
        if self.head_expand and self.head not in HEATMAP_HEADS:
            raise ValueError("head_expand needs a heatmap head")
        if (self.head in PIP_HEADS) != bool(self.pip_neighbours):
            raise ValueError("head='pip' or 'dual' needs pip_neighbours, and only they have them")
        if self.head_expand < 0:
            raise ValueError("head_expand must be >= 0")
        if self.backbone != "resnet":
            from fkp_core.backbones import BACKBONES

            if self.backbone not in BACKBONES:
                raise ValueError(f"backbone must be 'resnet' or one of {sorted(BACKBONES)}, got {self.backbone!r}")
            if self.backbone_hidden and self.backbone != "mobilenet_v2":
                raise ValueError("backbone_hidden needs backbone='mobilenet_v2'")
            if self.backbone_stride not in (8, 16, 32) or self.input_size % self.backbone_stride:
                raise ValueError("backbone_stride must be 8, 16 or 32 and divide input_size")
            if self.head not in HEATMAP_HEADS or self.heatmap_stride not in (4, 8, 16) or self.heatmap_stride > self.backbone_stride:
                raise ValueError("a pretrained backbone needs a heatmap head with heatmap_stride 4, 8 or 16 (<= backbone_stride)")
            if self.context and self.backbone_stride > 16:
                raise ValueError("context runs the backbone to 2 x backbone_stride, at most 32: backbone_stride <= 16")
            return
        if self.context:
            raise ValueError("context needs a pretrained backbone (mobilenet_v2, efficientnet_lite0)")
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError("widths and depths must be non-empty and of equal length")
        if self.input_size % (2 ** (len(self.widths) + 1)):
            raise ValueError(f"input_size must be a multiple of {2 ** (len(self.widths) + 1)}")
        if self.head not in ("fc", *HEATMAP_HEADS):
            raise ValueError(f"head must be 'fc' or one of {HEATMAP_HEADS}, got {self.head!r}")
        if self.head in HEATMAP_HEADS and self.heatmap_stride not in [2 ** (i + 1) for i in range(len(self.widths) + 1)]:
            raise ValueError("heatmap_stride must be the stride of one of the network's stages")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from JSON metadata; unknown keys are an error (a model file from elsewhere)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("widths", "depths", "backbone_hidden", "pip_neighbours"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(input_size=64, stem=16, widths=(16, 32, 64), depths=(1, 1, 1), head_hidden=64, dropout=0.0),
    "small": ModelConfig(stem=24, widths=(24, 48, 96, 192), depths=(1, 1, 2, 1)),
    "base": ModelConfig(),
    "deep": ModelConfig(depths=(2, 2, 3, 1)),
    "hm": ModelConfig(head="heatmap", head_hidden=64, heatmap_stride=8),
    "hm-deep": ModelConfig(head="heatmap", head_hidden=64, heatmap_stride=8, depths=(2, 2, 3, 1)),
    "large": ModelConfig(input_size=128, widths=(32, 64, 128, 256), depths=(2, 2, 2, 1)),
    # hm at 3/4 and 1/2 width (the bundled 'fast' and 'fastest' networks, distilled from the default)
    "hm-slim": ModelConfig(stem=24, widths=(24, 48, 96, 192), head="heatmap", head_hidden=48, heatmap_stride=8),
    "hm-thin": ModelConfig(stem=16, widths=(16, 32, 64, 128), head="heatmap", head_hidden=32, heatmap_stride=8),
    # ImageNet backbones (fkp_core.backbones) cut at stride 16, on upright 112-px crops; x in [0, 1] goes to
    # the folded gray stem as is (the ImageNet normalisation is inside its weights)
    "mnv2": ModelConfig(input_size=112, input_mean=0.0, input_std=1.0, head="heatmap", head_hidden=64, heatmap_stride=8,
                        backbone="mobilenet_v2", backbone_stride=16, upright=True),
    "lite0": ModelConfig(input_size=112, input_mean=0.0, input_std=1.0, head="heatmap", head_hidden=64, heatmap_stride=8,
                         backbone="efficientnet_lite0", backbone_stride=16, upright=True),
}


def _conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a (projected when needed) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), _conv_bn(cout, cout, relu=False))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class HeatmapHead(nn.Module):
    """Top-down decoder to one heatmap per point, read out by soft-argmax (integral regression).

    Keeps features spatial up to the output, so points are placed with sub-cell precision by
    the expectation over each heatmap rather than by dense layers that must learn geometry.
    """

    def __init__(self, stage_channels: list[int], stage_strides: list[int], out_stride: int, channels: int, size: int,
                 point_sigma: bool = False, expand: int = 0, context: bool = False):
        super().__init__()
        self.levels = [i for i, s in enumerate(stage_strides) if s >= out_stride]
        # context: the deepest stage joins through its own zero-initialised 1x1 (ModelConfig.context)
        self.context: nn.Conv2d | None = None
        if context:
            self.context = nn.Conv2d(stage_channels[self.levels.pop()], channels, 1, bias=False)
            nn.init.zeros_(self.context.weight)
        self.lateral = nn.ModuleList(nn.Conv2d(stage_channels[i], channels, 1, bias=False) for i in self.levels)
        self.smooth = nn.ModuleList(_conv_bn(channels, channels) for _ in self.levels[:-1])
        self.out = nn.Conv2d(channels, NUM_KEYPOINTS, 1)
        self.expand: nn.Sequential | None = None
        if expand:
            self.expand = nn.Sequential(nn.Conv2d(channels, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU(inplace=True),
                                        nn.Conv2d(expand, NUM_KEYPOINTS, 1))
            nn.init.zeros_(self.expand[-1].weight)
            nn.init.zeros_(self.expand[-1].bias)
        self.sigma: nn.Conv2d | None = None
        if point_sigma:
            self.sigma = nn.Conv2d(channels, NUM_KEYPOINTS, 1)
            nn.init.zeros_(self.sigma.weight)
            nn.init.constant_(self.sigma.bias, math.log(POINT_SIGMA_INIT))
        cells = size // out_stride
        centers = (torch.arange(cells, dtype=torch.float32) + 0.5) * (2.0 / cells) - 1.0  # cell centres in [-1, 1]
        self.register_buffer("_grid", centers, persistent=False)
        # heatmap spreads that score 1 and 0 (fkp_core.confidence); a model file's JSON may set its own
        from fkp_core.constants import KEYPOINT_SPREAD_FLAT, KEYPOINT_SPREAD_SHARP

        self.score_range = (KEYPOINT_SPREAD_SHARP, KEYPOINT_SPREAD_FLAT)

    def forward(self, stages: list[torch.Tensor], scores: bool = False, log_sd: bool = False) -> torch.Tensor:
        """(N, 68, 2) points in [-1, 1]; with ``scores``, (N, 68, 3): x, y and each point's score
        (:func:`~fkp_core.confidence.log_sd_keypoint_scores` of its expected error); with ``log_sd``, x, y and
        the log of that expected error (crop units), what training fits.

        The expected error is the learned one (``point_sigma``) where the head has it, else the spread of the
        point's heatmap (no weights of its own, so old model files give scores too).
        """
        x = self.features(stages)
        logits = self.logits(x)
        n, k, h, w = logits.shape
        prob = torch.softmax(logits.flatten(2), dim=-1).view(n, k, h, w)
        px, py = self.soft_argmax(prob)
        return self.readout(x, prob, px, py, scores, log_sd, mean=(px, py))

    def features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's features at the output stride (N, C, h, w)."""
        feats = [stages[i] for i in self.levels]
        x = self.lateral[-1](feats[-1])
        if self.context is not None:
            x = x + nn.functional.interpolate(self.context(stages[-1]), size=x.shape[-2:], mode="nearest")
        for k in range(len(feats) - 2, -1, -1):
            lat = self.lateral[k](feats[k])
            x = self.smooth[k](lat + nn.functional.interpolate(x, size=lat.shape[-2:], mode="nearest"))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The heatmaps' logits (N, 68, h, w) read from the decoder's features."""
        logits = self.out(x)
        if self.expand is not None:
            logits = logits + self.expand(x)
        return logits

    def soft_argmax(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each heatmap's mean position (px, py), each (N, 68), from its probabilities (N, 68, h, w)."""
        return (prob.sum(dim=2) * self._grid).sum(-1), (prob.sum(dim=3) * self._grid).sum(-1)

    def readout(self, x: torch.Tensor, prob: torch.Tensor, px: torch.Tensor, py: torch.Tensor, scores: bool,
                log_sd: bool, mean: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Points (px, py), with each one's score or log expected error when asked (:meth:`forward`); ``mean`` is the
        heatmaps' mean (:meth:`soft_argmax`) where the points are not it (None: computed when needed)."""
        if not (scores or log_sd):
            return torch.stack([px, py], dim=-1)
        if self.sigma is not None:
            # the error map read where the point's own mass is; detached, so it never moves the points
            sd_log = (prob.detach() * self.sigma(x.detach())).sum(dim=(2, 3))
        else:
            ex, ey = mean if mean is not None else self.soft_argmax(prob)
            mx, my = prob.sum(dim=2), prob.sum(dim=3)  # marginal distributions over columns and rows
            var = (mx * self._grid**2).sum(-1) - ex**2 + (my * self._grid**2).sum(-1) - ey**2
            sd_log = 0.5 * var.clamp_min(1e-12).log()
        if log_sd:
            return torch.stack([px, py, sd_log], dim=-1)
        from fkp_core.confidence import log_sd_keypoint_scores

        return torch.stack([px, py, log_sd_keypoint_scores(sd_log, *self.score_range)], dim=-1)


def _heatmap_head(config: ModelConfig, stage_channels: list[int], stage_strides: list[int]) -> HeatmapHead:
    args = (stage_channels, stage_strides, config.heatmap_stride, config.head_hidden, config.input_size)
    if config.head in PIP_HEADS:
        from fkp_core.pip_head import PipHead

        return PipHead(*args, config.pip_neighbours, config.point_sigma, config.head_expand, dual=config.head == "dual",
                       context=config.context)
    return HeatmapHead(*args, config.point_sigma, config.head_expand, config.context)


class KeypointNet(nn.Module):
    """(N, 1, S, S) gray crops in [0, 1] -> (N, 68, 2) keypoints in [-1, 1] crop units."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        if config.backbone != "resnet":
            from fkp_core.backbones import BACKBONES

            narrowed = {"hidden": config.backbone_hidden} if config.backbone_hidden else {}
            max_stride = config.backbone_stride * (2 if config.context else 1)
            self.backbone = BACKBONES[config.backbone](gray=True, max_stride=max_stride, **narrowed)
            self.head = _heatmap_head(config, self.backbone.out_channels, self.backbone.out_strides)
            self.register_buffer("_mean", torch.tensor(config.input_mean), persistent=False)
            self.register_buffer("_std", torch.tensor(config.input_std), persistent=False)
            return
        self.stem = _conv_bn(1, config.stem, stride=2)
        self.stages = nn.ModuleList()
        channels, strides, stage_channels = config.stem, [], []
        stride = 2
        for width, depth in zip(config.widths, config.depths):
            blocks = []
            for i in range(depth):
                blocks.append(ResidualBlock(channels, width, stride=2 if i == 0 else 1))
                channels = width
            stride *= 2
            self.stages.append(nn.Sequential(*blocks))
            strides.append(stride)
            stage_channels.append(width)
        side = config.input_size // stride
        if config.head in HEATMAP_HEADS:
            self.head: nn.Module = _heatmap_head(config, stage_channels, strides)
        else:
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(config.dropout),
                nn.Linear(channels * side * side, config.head_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(config.head_hidden, NUM_KEYPOINTS * 2),
            )
        self.register_buffer("_mean", torch.tensor(config.input_mean), persistent=False)
        self.register_buffer("_std", torch.tensor(config.input_std), persistent=False)

    def forward(self, x: torch.Tensor, scores: bool = False, log_sd: bool = False, maps: bool = False):
        """(N, 68, 2) keypoints; heatmap heads only: with ``scores``, (N, 68, 3) with each point's score in 0..1,
        with ``log_sd`` the log of its expected error instead (:meth:`HeatmapHead.forward`); pip heads only: with
        ``maps``, also the read-out's raw maps (:class:`~fkp_core.pip_head.PipMaps`), what training fits."""
        if (scores or log_sd) and not self.has_scores:
            raise ValueError("per-keypoint scores need a heatmap head")
        if maps and self.config.head not in PIP_HEADS:
            raise ValueError("raw maps come from a pip or dual head")
        if self.config.backbone != "resnet":
            stages = self.backbone((x - self._mean) / self._std)
        else:
            x = self.stem((x - self._mean) / self._std)
            stages = []
            for stage in self.stages:
                x = stage(x)
                stages.append(x)
        if maps:
            return self.head.with_maps(stages, scores, log_sd)
        if self.config.head in HEATMAP_HEADS:
            return self.head(stages, scores, log_sd)
        return self.head(x).view(-1, NUM_KEYPOINTS, 2)

    @property
    def has_scores(self) -> bool:
        """Whether ``forward(x, scores=True)`` works (heatmap heads)."""
        return self.config.head in HEATMAP_HEADS

    @property
    def first_conv(self) -> nn.Conv2d:
        """The first convolution, whose filters :mod:`fkp_core.viz` draws (input channel 0: the gray image)."""
        if self.config.backbone != "resnet":
            return self.backbone.first_conv
        return self.stem[0]

    def load_pretrained(self, path: str | None = None) -> list[str]:
        """Initialise the backbone from its ImageNet weights (the ``train`` extra); returns the file's unused keys."""
        if self.config.backbone == "resnet":
            raise ValueError("the resnet backbone has no pretrained weights")
        from fkp_core.backbones import load_pretrained

        return load_pretrained(self.backbone, self.config.backbone, path)


def build_model(config: ModelConfig | str = "base", **overrides) -> KeypointNet:
    """A fresh network from a config or a preset name, with optional field overrides."""
    if isinstance(config, str):
        if config not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {config!r}; choose from {sorted(MODEL_PRESETS)}")
        config = MODEL_PRESETS[config]
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    return KeypointNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
