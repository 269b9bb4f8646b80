"""fkp_core.training alone (no Ray): knowledge distillation pulls the network toward its teacher."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fkp_core.model import build_model
from fkp_core.training import Teacher, TrainConfig, make_optimizer, teacher_view, train_epoch


def _gap(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return float((a(images) - b(teacher_view(images, b.config.input_size))).abs().mean())


def _train(distill_weight: float | None, teacher_size: int = 64) -> tuple[float, float, float]:
    """(student-teacher gap before, after; student-labels gap after) for a few epochs on fixed data."""
    torch.manual_seed(0)
    images = torch.rand(32, 1, 64, 64)
    labels = torch.zeros(32, 68, 2)  # every point at the crop centre: far from what the teacher says
    teacher = build_model("tiny", input_size=teacher_size).eval()
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
            train_epoch(student, loader, opt, sched, "l1", torch.device("cpu"), Teacher(teacher), distill_weight)
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


def test_a_teacher_of_another_input_size_teaches_through_resampled_crops():
    before, after, _ = _train(distill_weight=1.0, teacher_size=96)
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("offset", [0.0, 0.02])
def test_a_mirrored_teacher_teaches_the_jobs_mirrored_pass(offset):
    """What a --distill-mirror teacher teaches is the mirrored pass the job runs (fkp_core.mirror.averaged) on the
    crops at its own size, and it is mirror-symmetric about its offset, whatever the network."""
    from fkp_core.mirror import averaged, unmirror

    torch.manual_seed(1)
    net = build_model("tiny", input_size=80).eval()
    with torch.no_grad():  # an asymmetric network: its mirror image disagrees with it
        net.head[-1].bias.copy_(torch.linspace(-0.8, 0.8, 136))
    images = torch.rand(4, 1, 64, 64)
    taught = Teacher(net, offset)(images)
    plain = Teacher(net)(images)
    with torch.no_grad():
        assert torch.equal(plain, net(teacher_view(images, 80))[..., :2])

    def predict(crops: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(crops))[:, None]).numpy()

    job = averaged(predict, offset)(teacher_view(images, 80)[:, 0].numpy())[..., :2]
    np.testing.assert_allclose(taught.numpy(), job, atol=1e-5)
    assert (taught - plain).abs().mean() > 0.01  # the second look moved the points
    # mirror-symmetric: its points on the mirrored crops, mapped back with its offset, are its points on the crops
    back = unmirror(Teacher(net, offset)(images.flip(-1)).numpy(), offset)
    np.testing.assert_allclose(back, taught.numpy(), atol=1e-5)


@pytest.mark.parametrize("size", [48, 112])
def test_teacher_view_keeps_the_crop_frame(size):
    """A point drawn at crop coordinates p is still at p after resampling to the teacher's size: [-1, 1]
    spans the pixels' outer edges at every size, so the teacher's answers are the student's coordinates."""
    from fkp_core.transforms import denormalize_keypoints, normalize_keypoints

    img = np.zeros((80, 80), np.float32)
    px = np.array([[20.0, 50.0]], np.float32)
    cv2.circle(img, (int(px[0, 0] * 16), int(px[0, 1] * 16)), 5 * 16, 1.0, -1, shift=4)
    p = normalize_keypoints(px, 80)
    out = teacher_view(torch.from_numpy(img)[None, None], size)[0, 0].numpy()
    assert out.shape == (size, size)
    ys, xs = np.mgrid[:size, :size]
    centroid = np.array([[(xs * out).sum(), (ys * out).sum()]]) / out.sum()
    np.testing.assert_allclose(normalize_keypoints(centroid, size), p, atol=0.01)
    np.testing.assert_allclose(denormalize_keypoints(p, size), centroid, atol=0.01 * size / 2)


# ---- flips per source, upright crops, the wild augmentations ----


from conftest import dot_image, grid_keypoints  # noqa: E402
from fkp_core.constants import FLIP_PERMUTATION  # noqa: E402
from fkp_core.dataset import Record  # noqa: E402
from fkp_core.training import make_datasets, wild_transform  # noqa: E402
from fkp_core.transforms import AugmentConfig, Sample, eye_angle, to_tensors  # noqa: E402

_LEVELS = 60 + 2.5 * np.arange(68)
_STILL = AugmentConfig(rotation=0.0, scale=(1.0, 1.0), translate=0.0, flip=1.0, box_jitter_scale=0.0, box_jitter_shift=0.0,
                       photometric=False, occlusion=0.0)


def _records(tmp_path, tilt_degrees: float = 0.0) -> list[Record]:
    import cv2

    kp = grid_keypoints((110.0, 100.0), spacing=14.0)
    if tilt_degrees:
        m = cv2.getRotationMatrix2D((110.0, 100.0), tilt_degrees, 1.0)
        kp = (kp @ m[:, :2].T + m[:, 2]).astype(np.float32)
    path = tmp_path / f"dots{tilt_degrees:g}.png"
    cv2.imwrite(str(path), dot_image(kp, (220, 220), radius=4))
    return [Record(path, kp, "p0", "course", "c"), Record(path, kp, "p1", "helen", "h")]


def _labels_under_keypoints(image: torch.Tensor, kp: torch.Tensor) -> np.ndarray:
    """The label of the disc under each keypoint (nearest gray level), -1 where none."""
    img = image[0].numpy() * 255
    size = img.shape[0]
    px = ((kp.numpy() + 1) * size / 2 - 0.5).round().astype(int)
    out = []
    for x, y in px:
        v = img[y, x] if 0 <= x < size and 0 <= y < size else 0
        i = int(np.argmin(np.abs(_LEVELS - v)))
        out.append(i if abs(_LEVELS[i] - v) < 1.0 else -1)
    return np.asarray(out)


@pytest.mark.parametrize("upright", [False, True])
def test_flips_relabel_300w_samples_and_leave_course_samples_alone(tmp_path, upright):
    records = _records(tmp_path, tilt_degrees=12.0)
    cfg = TrainConfig(augment=_STILL)
    train, _ = make_datasets(records, records, cfg, 224, 0.2, upright=upright, mirror_sources={"helen": 0.0})
    (course_img, course_kp, _), (helen_img, helen_kp, _) = train[0], train[1]
    # course: not flipped, every point on its own disc
    assert (_labels_under_keypoints(course_img, course_kp) == np.arange(68)).all()
    # 300-W: mirrored, and each point relabelled so that it sits on the disc of its mirror partner
    assert (_labels_under_keypoints(helen_img, helen_kp) == np.asarray(FLIP_PERMUTATION)).all()
    assert not torch.allclose(course_img, helen_img)
    np.testing.assert_allclose(helen_kp[:, 0].numpy(), -course_kp[list(FLIP_PERMUTATION), 0].numpy(), atol=2e-3)
    # and without the flip on: both sources alike
    plain, _ = make_datasets(records, records, TrainConfig(augment=AugmentConfig(**{**_STILL.__dict__, "flip": 0.0})), 224, 0.2,
                             upright=upright, mirror_sources={"helen": 0.0})
    assert (_labels_under_keypoints(*plain[1][:2]) == np.arange(68)).all()


def test_a_flipped_source_keeps_its_labels_offset_from_what_they_mark(tmp_path):
    """Labels that sit 3 px right of their discs: the flipped copy's labels sit 3 px right of the mirrored discs too."""
    from dataclasses import replace

    records = _records(tmp_path, tilt_degrees=0.0)
    shifted = [replace(r, keypoints=r.keypoints + np.float32([3.0, 0.0])) for r in records]
    cfg = TrainConfig(augment=_STILL)
    for shift, want in ((3.0, 3.0), (0.0, -3.0)):  # with the offset kept / with a plain mirror (the offset turned round)
        train, _ = make_datasets(shifted, shifted, cfg, 224, 0.2, mirror_sources={"helen": shift, "course": shift})
        for (img, kp, _), rec in zip((train[0], train[1]), records):
            truth = _disc_centres(img)[list(FLIP_PERMUTATION)]  # the mirrored discs, relabelled
            scale = truth.std(0).mean() / rec.keypoints.std(0).mean()  # crop pixels per image pixel
            offset = ((kp.numpy() + 1) * 112 - 0.5 - truth).mean(0) / scale
            assert offset[0] == pytest.approx(want, abs=0.3) and offset[1] == pytest.approx(0.0, abs=0.3)


def _disc_centres(image: torch.Tensor) -> np.ndarray:
    """(68, 2) centroid of each labelled disc in crop pixels (its flat inside: resampled edges pass through other levels)."""
    img = image[0].numpy() * 255
    out = np.full((68, 2), np.nan)
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    for i, level in enumerate(_LEVELS):
        mask = cv2.erode((np.abs(img - level) < 1.0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if mask.any():
            out[i] = xs[mask].mean(), ys[mask].mean()
    return out


def test_upright_crops_level_the_eyes_and_validation_uses_them(tmp_path):
    records = _records(tmp_path, tilt_degrees=25.0)
    assert abs(np.degrees(eye_angle(records[0].keypoints)) - np.degrees(eye_angle(_records(tmp_path)[0].keypoints))) > 20
    train, val = make_datasets(records, records, TrainConfig(augment=_STILL), 224, 0.2, upright=True)
    flat, _ = make_datasets(_records(tmp_path), _records(tmp_path), TrainConfig(augment=_STILL), 224, 0.2, upright=True)
    for tilted, level in ((train[0], flat[0]), (val[0], flat[0])):
        np.testing.assert_allclose(tilted[1].numpy(), level[1].numpy(), atol=2e-3)  # same crop whatever the roll
        assert (_labels_under_keypoints(tilted[0], tilted[1]) == np.arange(68)).all()


def test_wild_augmentations_keep_the_labels_and_change_the_pixels(tmp_path):
    records = _records(tmp_path)
    cfg = TrainConfig(occluders=1.0, low_light=1.0, motion_blur=1.0, jpeg=1.0, augment=AugmentConfig(**{**_STILL.__dict__, "flip": 0.0}))
    tf = wild_transform(224, cfg, 0.2, upright=True)
    plain = wild_transform(224, TrainConfig(augment=cfg.augment), 0.2, upright=True)
    import cv2

    image = cv2.imread(str(records[0].image_path), cv2.IMREAD_GRAYSCALE)
    for seed in range(4):
        a = tf(Sample(image, records[0].keypoints.copy()), np.random.default_rng(seed))
        b = plain(Sample(image, records[0].keypoints.copy()), np.random.default_rng(seed))
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)  # photometric and occluders: no geometry
        assert a.image.dtype == np.float32 and a.image.shape == (224, 224) and 0 <= a.image.min() and a.image.max() <= 1
        assert np.abs(a.image - b.image).mean() > 0.01


@pytest.mark.parametrize("seed", range(4))
def test_three_quarter_views_turn_the_face_and_keep_each_label_on_its_point(tmp_path, seed):
    records = _records(tmp_path)
    still = AugmentConfig(**{**_STILL.__dict__, "flip": 0.0})
    turned = wild_transform(224, TrainConfig(three_quarter=1.0, augment=still), 0.2, upright=True)
    plain = wild_transform(224, TrainConfig(augment=still), 0.2, upright=True)
    image = cv2.imread(str(records[0].image_path), cv2.IMREAD_GRAYSCALE)
    a = turned(Sample(image, records[0].keypoints.copy()), np.random.default_rng(seed))
    b = plain(Sample(image, records[0].keypoints.copy()), np.random.default_rng(seed))
    img, kp = to_tensors(a)
    assert (_labels_under_keypoints(img, kp) == np.arange(68)).all()  # every disc moved with its label
    shift = a.keypoints - b.keypoints
    assert np.abs(shift[:, 1]).max() < 1e-3 and np.abs(shift[:, 0]).max() > 3  # a turn about the vertical axis
    rows = a.keypoints[:63, 0].reshape(7, 9)
    assert (np.diff(rows, axis=1) > 0).all()  # one-to-one: each row keeps its order
    # the middle of the face moves more than its sides (depth), unlike a shear or a shift
    middle, sides = np.abs(shift[[4, 13, 22, 31, 40], 0]), np.abs(shift[[0, 8, 36, 44], 0])
    assert middle.mean() > sides.mean() + 1


def test_nonface_crops_lose_their_labels_and_leave_the_face():
    from fkp_core.transforms import to_tensors

    kp = grid_keypoints((450.0, 450.0), spacing=14.0)
    image = dot_image(kp, (900, 900), radius=4)  # the face in the middle of a large empty frame
    still = AugmentConfig(**{**_STILL.__dict__, "flip": 0.0})
    face = wild_transform(128, TrainConfig(augment=still), 0.2, upright=True)
    moved = wild_transform(128, TrainConfig(nonface=1.0, augment=still), 0.2, upright=True)
    on_face = face(Sample(image, kp.copy()), np.random.default_rng(0))
    face_lit = float((on_face.image > 0.1).mean())
    kinds = set()
    for seed in range(12):
        s = moved(Sample(image, kp.copy()), np.random.default_rng(seed))
        img, labels = to_tensors(s)
        assert not s.face and torch.isnan(labels).all()
        std = float(img.std())
        kind = "blank" if std < 0.02 else "noise" if std > 0.25 else "moved"
        if kind == "moved":  # at most a sliver of the dots the face crop is full of
            assert float((img > 0.1).float().mean()) < 0.5 * face_lit
        kinds.add(kind)
    assert "moved" in kinds and len(kinds) >= 2
    assert not torch.isnan(to_tensors(on_face)[1]).any()


def test_error_head_learns_which_crops_have_no_face_and_never_moves_the_points():
    from fkp_core.training import LOSSES, batch_loss, point_sigma_nll

    torch.manual_seed(0)
    faces = torch.zeros(16, 1, 64, 64)
    faces[:, :, 16:48, 16:48] = 0.8  # a bright square "face", points on a grid over it
    noise = torch.rand(16, 1, 64, 64)
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.5, 0.5, 8), torch.linspace(-0.5, 0.5, 9), indexing="ij"), -1)
    labels = grid.flip(-1).reshape(-1, 2)[:68].expand(16, 68, 2).clone()
    images = torch.cat([faces, noise])
    targets = torch.cat([labels, torch.full_like(labels, float("nan"))])
    model = build_model("tiny", head="heatmap", heatmap_stride=8, point_sigma=True)
    # the error head's loss reaches the error head only
    out = model(images, log_sd=True)
    point_sigma_nll(out[..., 2], out[..., :2], targets).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"head.sigma.weight", "head.sigma.bias"}
    model.zero_grad()
    loader = DataLoader(TensorDataset(images, targets, torch.zeros(32, dtype=torch.long)), batch_size=8, shuffle=True)
    cfg = TrainConfig(epochs=30, lr=3e-3, warmup_epochs=0)
    opt, sched = make_optimizer(model, cfg, len(loader))
    assert torch.isfinite(batch_loss(model, images, targets, LOSSES["wing"], True))
    for _ in range(cfg.epochs):
        train_epoch(model, loader, opt, sched, "wing", torch.device("cpu"), point_sigma=True)
    model.eval()
    with torch.no_grad():
        log_sd = model(images, log_sd=True)[..., 2]
        scores = model(images, scores=True)[..., 2]
    assert log_sd[16:].mean() > log_sd[:16].mean() + 1.0  # non-faces: far larger expected errors
    assert torch.isfinite(scores).all() and scores[:16].mean() >= scores[16:].mean()


class _Recorder:
    """A stand-in scheduler that records the weights after every optimizer step (train_epoch steps it right after)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.states = model, []

    def step(self) -> None:
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


def test_the_weight_average_is_the_exponential_average_of_every_step(tmp_path):
    from fkp_core.checkpoints import load_state, save_state
    from fkp_core.training import weight_average

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(24, 1, 64, 64), torch.rand(24, 68, 2) * 2 - 1, torch.zeros(24, dtype=torch.long)),
                        batch_size=8)
    model = build_model("tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema, record, decay = weight_average(model, 0.6), _Recorder(model), 0.6
    for _ in range(2):
        train_epoch(model, loader, opt, record, "l1", torch.device("cpu"), ema=ema)
    assert len(record.states) == 6
    for name, value in ema.module.state_dict().items():
        if not value.is_floating_point():
            continue
        expected = record.states[0][name]  # the first step's weights start the average
        for state in record.states[1:]:
            expected = decay * expected + (1 - decay) * state[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema.module.stem[0].weight, model.stem[0].weight)  # it lags the last step
    # a checkpoint keeps the average: a resumed run goes on from it
    save_state(tmp_path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None, {"epoch": 1}, ema)
    resumed = weight_average(build_model("tiny"), decay)
    other = build_model("tiny")
    load_state(tmp_path, other, torch.optim.SGD(other.parameters(), lr=0.5),
               torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.device("cpu"), resumed)
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)


def test_pose_balance_draws_turned_faces_more_often_and_keeps_each_sources_share():
    from conftest import mean_face
    from fkp_core.constants import NOSE_TIP
    from fkp_core.training import WeightedDistributedSampler, pose_balanced, source_weights

    face = mean_face()
    half_width = (face[16, 0] - face[0, 0]) / 2
    records = []
    for source, n in (("course", 6), ("helen", 2)):
        for i in range(n):
            kp = face.copy()
            kp[NOSE_TIP, 0] += half_width * (0.5 if i == 0 else 0.0)  # the first face of each source is turned
            records.append(Record(f"{source}{i}.png", kp, f"p{i}", source, "o"))
    base = source_weights(records, {"course": 1.0, "helen": 3.0})
    assert pose_balanced(base, records, 0.0) == pytest.approx(base)
    balanced = np.asarray(pose_balanced(base, records, 2.0))
    for source in ("course", "helen"):
        here = np.array([r.source == source for r in records])
        assert balanced[here].sum() == pytest.approx(np.asarray(base)[here].sum())  # the source's share stays
        turned, frontal = balanced[here][0], balanced[here][1:]
        assert turned / frontal == pytest.approx(2.0)  # 1 + 2 * 0.5
    draws = np.array(list(WeightedDistributedSampler(balanced.tolist(), 40_000, seed=1)))
    counts = np.bincount(draws, minlength=len(records)) / len(draws)
    assert counts == pytest.approx(balanced, abs=0.01)
