"""A cheaper copy of a trained MobileNetV2 network: its early blocks cut to the hidden channels that carry most.

On a CPU, most of the backbone's time goes to its first, high-resolution blocks (an inverted residual's
hidden channels are expanded, filtered and projected at every pixel), while the decoder reads its features
at stride 8 and 16. Keeping the hidden channels of the blocks up to some stride that matter most, by weight,
gives a narrower network that starts close to the trained one; fine-tuning (best, taught by the trained
network: ``jobs.train --init MODEL --prune KEEP --distill MODEL``) recovers the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from fkp_core.model import KeypointNet, build_model

PRUNE_MULTIPLE = 8  # hidden widths stay multiples of this: ONNX Runtime's CPU kernels work in blocks of 8 channels


def hidden_widths(backbone: nn.Module) -> list[int]:
    """Each block's hidden channels, the first block's being the stem's outputs."""
    return [block.conv[-2].in_channels for block in list(backbone.features)[1:]]


def pruned_widths(backbone: nn.Module, keep: float, max_stride: int) -> list[int]:
    """The hidden widths after keeping ``keep`` of each block's up to output stride ``max_stride``."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    early = len(backbone.early_modules(max_stride)) - 1  # blocks up to the stride (the stem comes with the first)
    return [max(PRUNE_MULTIPLE, round(w * keep / PRUNE_MULTIPLE) * PRUNE_MULTIPLE) if i < early else w
            for i, w in enumerate(hidden_widths(backbone))]


def channel_importance(block: nn.Module) -> torch.Tensor:
    """How much each hidden channel can pass on: its depthwise filter's batch-norm scale times the weight the
    projection gives it (the channel's output is at most that, ReLU6 being bounded)."""
    depthwise_bn = block.conv[-3][1]
    projection = block.conv[-2].weight  # (out, hidden, 1, 1)
    return depthwise_bn.weight.detach().abs() * projection.detach().abs().sum(dim=(0, 2, 3))


def _take(module: nn.Module, index: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> None:
    """The entries of ``module``'s parameters and buffers for output channels ``index`` (conv or batch norm)."""
    for name, value in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        state[prefix + name] = value.detach()[index].clone() if value.dim() > 0 else value.detach().clone()


def prune(model: KeypointNet, keep: float, max_stride: int = 8) -> KeypointNet:
    """``model`` with ``keep`` of the hidden channels of its MobileNetV2 blocks up to ``max_stride``, those of most
    :func:`channel_importance`; every other weight as it was. Not equivalent to the original: fine-tune it."""
    if model.config.backbone != "mobilenet_v2":
        raise ValueError(f"only a mobilenet_v2 backbone can be pruned (this one is {model.config.backbone!r})")
    backbone = model.backbone
    widths = pruned_widths(backbone, keep, max_stride)
    narrow = build_model(model.config, backbone_hidden=tuple(widths))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    features = list(backbone.features)
    for i, (block, width, had) in enumerate(zip(features[1:], widths, hidden_widths(backbone)), start=1):
        if width == had:
            continue
        index = channel_importance(block).argsort(descending=True)[:width].sort().values
        prefix = f"backbone.features.{i}.conv."
        producers = [(features[0], "backbone.features.0.")] if len(block.conv) == 3 else [(block.conv[0], prefix + "0.")]
        producers.append((block.conv[-3], prefix + f"{len(block.conv) - 3}."))  # the depthwise filter
        for seq, pre in producers:  # conv + batch norm (+ ReLU6): output channels
            _take(seq[0], index, state, pre + "0.")
            _take(seq[1], index, state, pre + "1.")
        state[prefix + f"{len(block.conv) - 2}.weight"] = block.conv[-2].weight.detach()[:, index].clone()
    narrow.load_state_dict(state)
    return narrow.train(model.training)
