"""fkp_core.training alone (no Ray): knowledge distillation pulls the network toward its teacher."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from fkp_core.model import build_model
from fkp_core.training import TrainConfig, make_optimizer, train_epoch


def _gap(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return float((a(images) - b(images)).abs().mean())


def _train(distill_weight: float | None) -> tuple[float, float, float]:
    """(student-teacher gap before, after; student-labels gap after) for a few epochs on fixed data."""
    torch.manual_seed(0)
    images = torch.rand(32, 1, 64, 64)
    labels = torch.zeros(32, 68, 2)  # every point at the crop centre: far from what the teacher says
    teacher = build_model("tiny").eval()
    with torch.no_grad():  # a teacher with a clear, non-trivial answer: spread its output layer
        teacher.head[-1].bias.copy_(torch.linspace(-0.8, 0.8, 136))
    student = build_model("tiny")
    loader = DataLoader(TensorDataset(images, labels, torch.zeros(32, dtype=torch.long)), batch_size=8)
    cfg = TrainConfig(epochs=15, lr=3e-3, warmup_epochs=0)
    opt, sched = make_optimizer(student, cfg, len(loader))
    before = _gap(student, teacher, images)
    for _ in range(cfg.epochs):
        if distill_weight is None:
            train_epoch(student, loader, opt, sched, "l1", torch.device("cpu"))
        else:
            train_epoch(student, loader, opt, sched, "l1", torch.device("cpu"), teacher, distill_weight)
    student.eval()
    with torch.no_grad():
        to_labels = float((student(images) - labels).abs().mean())
    return before, _gap(student, teacher, images), to_labels


def test_distillation_fits_the_teacher_and_labels_alone_do_not():
    before, after, _ = _train(distill_weight=1.0)
    assert after < 0.3 * before, (before, after)
    _, plain_after, plain_to_labels = _train(distill_weight=None)
    assert plain_after > 2 * after and plain_to_labels < 0.1  # without a teacher the labels win
    _, half_after, half_to_labels = _train(distill_weight=0.5)
    assert after < half_after < plain_after  # the weight moves the network between the two
