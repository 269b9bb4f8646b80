"""jobs.train on Ray Train (2 CPU workers, generated data), resume, download, usage errors; jobs.evaluate."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PROJECT_ROOT, imagenet_weights, make_course_dataset, make_ibug_dataset
from fkp_core.dataset import read_course, read_image
from fkp_core.transforms import box_from_keypoints, crop_matrix, denormalize_keypoints
from fkp_core.weights import load_model
from jobs import evaluate, train, train_data

TINY = ["--model", "tiny", "--batch-size", "8", "--num-workers", "2", "--cpus-per-worker", "0.5", "--loader-workers", "0",
        "--val-fraction", "0.4", "-q"]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return make_course_dataset(tmp_path_factory.mktemp("course"), n=24, people=8)


def _main(module, argv) -> int:
    try:
        return module.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


@pytest.mark.slow
def test_two_worker_run_makes_a_loadable_model_from_mixed_sources(ray_session, course, tmp_path, capfd):
    helen = make_ibug_dataset(tmp_path / "helen", n=10)
    out = tmp_path / "model"
    code = _main(train, ["--data", f"course:{course}", "--data", f"ibug:{helen}@2", "--epochs", "2", "--output", out,
                         "--name", "t", "--ema", "0.9", *TINY])
    assert code == 0
    time.sleep(1.5)  # worker logs reach the driver asynchronously
    logs = capfd.readouterr()
    # no state API on the embedded instance: Ray Train's cleaner would warn once a second for the whole run
    assert "State API may be temporarily unavailable" not in logs.out + logs.err
    loaded = load_model(out / "t.pt")
    meta = loaded.metadata
    assert meta["trained"]["workers"] == 2 and meta["trained"]["epochs_run"] == 2
    assert set(meta["metrics"]["validation"]) >= {"val_nme", "val_nme/course", "val_nme/helen"}
    assert [s["weight"] for s in meta["trained"]["sources"]] == [1.0, 2.0]
    assert meta["trained"]["train_config"]["ema"] == 0.9  # validated and exported: the weights' moving average
    assert "jobs.train" in meta["trained"]["command"]
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 1, 64, 64)).shape == (1, 68, 2)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_model(ray_session, course, tmp_path):
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    torch.manual_seed(123)
    parent_path = save_model(build_model("tiny").eval(), tmp_path / "parent" / "p", {"trained": {"command": "parent cmd"}})
    parent = load_model(parent_path)
    # a teacher of another input size (it sees the crops resampled) teaching its mirrored pass, recorded in the metadata
    teacher_path = save_model(build_model("tiny", input_size=80).eval(), tmp_path / "teacher" / "t", {"mirror_offset": 0.01})
    # a learning rate so small that training cannot move the weights: what comes out is what went in,
    # from now on trained (and described) as an upright model
    code = _main(train, ["--data", f"course:{course}", "--epochs", "1", "--lr", "1e-12", "--init", parent_path,
                         "--distill", teacher_path, "--distill-weight", "0.7", "--distill-mirror", "--upright",
                         "--output", tmp_path / "ft", "--name", "ft", *[a for a in TINY if a not in ("--model", "tiny")]])
    assert code == 0
    child = load_model(tmp_path / "ft" / "ft.pt")
    assert not parent.config.upright and child.config == replace(parent.config, upright=True)
    assert "upright" in child.metadata["normalization"]["face_box"]
    assert child.metadata["trained"]["init"]["sha256"] == parent.metadata["sha256"]
    assert child.metadata["trained"]["distill"]["sha256"] == load_model(teacher_path).metadata["sha256"]
    assert child.metadata["trained"]["train_config"]["distill_weight"] == 0.7
    assert child.metadata["trained"]["train_config"]["distill_mirror"] and child.metadata["trained"]["distill"]["mirror_offset"] == 0.01
    assert child.metadata["trained"]["init"]["trained"]["command"] == "parent cmd"
    convs = [k for k, v in parent.model.state_dict().items() if k.endswith("weight") and v.ndim == 4]
    fresh = build_model("tiny").state_dict()
    for k in convs:
        torch.testing.assert_close(child.model.state_dict()[k], parent.model.state_dict()[k], atol=1e-6, rtol=0)
        assert not torch.allclose(fresh[k], parent.model.state_dict()[k])


def _recorded_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train's controller has registered (-1: none yet).

    The controller registers a checkpoint one poll (~2 s) after the worker has written it, and a re-run
    resumes from what it registered, not from the newest folder on disk.
    """
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return -1
    return int(latest["metrics"]["epoch"]) if latest else -1


def _session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) of session ``sid``: Ray's actors outlive a killed driver by a few seconds."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state, _ppid, _pgrp, session = (d / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            except (OSError, IndexError, ValueError):
                continue
            if int(session) == sid and state != "Z":  # a zombie writes nothing; its reaping is up to PID 1
                pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(course, tmp_path):
    """SIGKILL after Ray has registered checkpoints, then the same command again: it continues, not restarts."""
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "jobs.train", "--data", f"course:{course}", "--epochs", "40", "--output", str(out),
           "--name", "r", "--ema", "0.9", *[a for a in TINY if a not in ("--num-workers", "2")], "--num-workers", "1"]
    env = {**os.environ, "FKP_RAY_TEMP_DIR": f"/tmp/fkp-rt-train-{os.getpid()}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    run_dir = out / "checkpoints" / "r"
    while time.time() < deadline and proc.poll() is None and _recorded_epoch(run_dir) < 1:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown at all
    proc.wait(timeout=60)
    gone = time.time() + 60
    while _session_pids(proc.pid) and time.time() < gone:  # the orphaned controller may still register one
        time.sleep(0.2)
    assert not _session_pids(proc.pid)
    recorded = _recorded_epoch(run_dir)
    assert 1 <= recorded < 39
    again = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    resumed = [int(x) for x in re.findall(r"resuming from epoch (\d+)", log)]
    assert resumed == [recorded + 1], log[-3000:]  # the epoch after the last one Ray had registered, once
    meta = load_model(out / "r.pt").metadata
    assert meta["trained"]["epochs_run"] == 40


def test_download_and_unpack_from_a_local_archive(tmp_path):
    src = make_course_dataset(tmp_path / "src", n=4)
    archive = tmp_path / "train-test-data.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # the public archive keeps the layout at its top level
        for p in src.rglob("*"):
            zf.write(p, p.relative_to(src))
        zf.writestr("__MACOSX/._junk", b"x")
    dest = tmp_path / "data"
    train_data.download_course_data(archive.as_uri(), dest)
    assert len(read_course(dest)) == 4
    assert not (dest / "__MACOSX").exists()


def test_download_rejects_bad_archives(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(train.UsageError, match="not a zip"):
        train_data.download_course_data(bad.as_uri(), tmp_path / "d1")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(train.UsageError, match="training_frames_keypoints.csv"):
        train_data.download_course_data(empty.as_uri(), tmp_path / "d2")
    with pytest.raises(train.UsageError, match="cannot download"):
        train_data.download_course_data((tmp_path / "missing.zip").as_uri(), tmp_path / "d3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "course:{tmp}/nope"], "no such directory"),
        (["--data", "{tmp}/empty"], "neither the course layout"),
        (["--data", "{course}", "--epochs", "0"], "--epochs"),
        (["--data", "{course}", "--storage", "relative/path"], "absolute path or a URI"),
        (["--data", "{course}", "--val-fraction", "0.01"], "--val-fraction"),
        (["--data", "{course}", "--model", "huge"], "invalid choice"),
        (["--data", "{course}", "--lr", "fast"], "invalid float value"),
        (["--data", "{course}", "--init", "{tmp}/none.pt"], "model file not found"),
        (["--data", "{course}", "--init", "bundled", "--model", "tiny"], "leave out --model"),
        (["--data", "{course}", "--init", "hm", "--input-size", "128"], "needs a model with a pretrained backbone"),
        (["--data", "{course}", "--init", "default", "--input-size", "100"], "does not fit the --init model"),
        (["--data", "{course}", "--prune", "0.5"], "--prune narrows an --init model with a MobileNetV2 backbone"),
        (["--data", "{course}", "--init", "hm", "--prune", "0.5"], "--prune narrows an --init model with a MobileNetV2 backbone"),
        (["--data", "{course}", "--init", "default", "--prune", "1"], "--prune"),
        (["--data", "{course}", "--distill", "{tmp}/none.pt"], "model file not found"),
        (["--data", "{course}", "--distill", "bundled", "--distill-weight", "0"], "--distill-weight"),
        (["--data", "{course}", "--ema", "1"], "--ema"),
        (["--data", "{course}", "--model", "hm", "--context"], "--context needs a model with a pretrained backbone"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, course, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, course=course) for a in argv] + ["--output", str(tmp_path / "o")]
    assert _main(train, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_teacher_cropping_with_another_margin_is_a_usage_error(tmp_path, capsys, course):
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    teacher = save_model(build_model("tiny", crop_margin=0.3).eval(), tmp_path / "t" / "t")
    assert _main(train, ["--data", course, "--distill", teacher, "--model", "tiny", "--output", tmp_path / "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert "must see the same crops" in err and len(err.splitlines()) == 1, err


def test_a_mirrored_teacher_needs_a_teacher_with_a_fitted_offset(tmp_path, capsys, course):
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    plain = save_model(build_model("tiny").eval(), tmp_path / "t" / "t")  # never fitted: no "mirror_offset"
    for extra, message in ((["--distill", plain], "no fitted mirror offset"), ([], "--distill-mirror needs --distill")):
        code = _main(train, ["--data", course, *extra, "--distill-mirror", "--model", "tiny", "--output", tmp_path / "o"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_missing_default_data_dir_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FKP_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _main(train, ["--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "train-test-data.zip" in err


def test_evaluate_reports_the_nme_computed_independently(tmp_path):
    data = make_course_dataset(tmp_path / "data", n=10, people=5, split="test")
    torch.manual_seed(0)
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    model_path = save_model(build_model("tiny").eval(), tmp_path / "m" / "tiny")
    out = tmp_path / "eval"
    assert _main(evaluate, ["--model", model_path, "--data", f"course:{data}", "--refine", "0", "--out", out, "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    # the same protocol written out by hand: crop of the keypoint box, forward pass, back to pixels
    model = load_model(model_path).model
    errors = []
    for rec in read_course(data, "test"):
        img = read_image(rec.image_path)
        m = crop_matrix(box_from_keypoints(rec.keypoints), 64, model.config.crop_margin)
        import cv2

        crop = cv2.warpAffine(img, m[:2], (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        with torch.no_grad():
            out_n = model(torch.from_numpy(crop.astype(np.float32) / 255)[None, None])[0].numpy()
        px = denormalize_keypoints(out_n, 64)
        inv = np.linalg.inv(m)
        pred = px @ inv[:2, :2].T + inv[:2, 2]
        iod = np.linalg.norm(rec.keypoints[36] - rec.keypoints[45])
        errors.append(np.linalg.norm(pred - rec.keypoints, axis=1).mean() / iod)
    assert report["sources"]["course"]["gt_box"]["nme"] == pytest.approx(float(np.mean(errors)), rel=1e-4)
    assert report["sources"]["course"]["faces"] == 10
    assert (out / "ced.png").is_file() and (out / "course_grid.png").is_file()


@pytest.mark.slow
def test_two_epochs_from_imagenet_weights_with_the_wild_recipe(ray_session, course, tmp_path):
    from fkp_core.model import build_model

    imagenet_weights()
    helen = make_ibug_dataset(tmp_path / "helen", n=10)
    out = tmp_path / "model"
    tiny = [a for a in TINY if a not in ("--model", "tiny")]
    code = _main(train, ["--data", f"course:{course}", "--data", f"ibug:{helen}", "--epochs", "2", "--model", "mnv2",
                         "--input-size", "64", "--pretrained", "--freeze-stride", "4", "--rotation", "8", "--flip", "0.5", "--mirror-course",
                         "--occluders", "0.3", "--low-light", "0.2", "--motion-blur", "0.1", "--jpeg", "0.3",
                         "--point-sigma", "--nonface", "0.2", "--three-quarter", "0.3", "--pose-balance", "2", "--output", out, "--name", "p", *tiny])
    assert code == 0
    loaded = load_model(out / "p.pt")
    assert loaded.config.backbone == "mobilenet_v2" and loaded.config.upright and loaded.config.input_size == 64
    assert loaded.config.point_sigma
    tc = loaded.metadata["trained"]["train_config"]
    assert tc["pretrained"] and tc["freeze_stride"] == 4 and tc["occluders"] == 0.3 and tc["augment"]["flip"] == 0.5
    assert tc["point_sigma"] and tc["nonface"] == 0.2 and tc["three_quarter"] == 0.3 and tc["mirror_course"]
    assert tc["pose_balance"] == 2
    # the error head was fitted (it starts as a constant: zero weights)
    assert loaded.model.head.sigma.weight.abs().sum() > 0
    assert loaded.metadata["trained"]["epochs_run"] == 2
    assert "upright" in loaded.metadata["normalization"]["face_box"]
    # the run started from ImageNet: the frozen early layers are exactly the folded ImageNet weights,
    # the layers after them were trained away from those weights
    ref = build_model("mnv2", input_size=64)
    ref.load_pretrained()
    got, want = loaded.model.backbone.state_dict(), ref.backbone.state_dict()
    early = len(ref.backbone.early_modules(4))
    frozen = [k for k in want if int(k.split(".")[1]) < early]
    trained = [k for k in want if int(k.split(".")[1]) >= early and k.endswith("weight")]
    assert frozen and all(torch.equal(got[k], want[k]) for k in frozen)
    assert any(not torch.equal(got[k], want[k]) for k in trained)
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 1, 64, 64)).shape == (1, 68, 2)
        scores = loaded.model(torch.rand(1, 1, 64, 64), scores=True)[..., 2]
    assert ((scores >= 0) & (scores <= 1)).all()
    # --export-checkpoint writes the same best epoch from the run's checkpoint, without training
    code = _main(train, ["--export-checkpoint", "--output", tmp_path / "exported", "--storage", (out / "checkpoints").resolve(),
                         "--name", "p", "-q"])
    assert code == 0
    exported = load_model(tmp_path / "exported" / "p.pt")
    assert exported.metadata["trained"]["best_epoch"] == loaded.metadata["trained"]["best_epoch"]
    assert "after epoch 2 of 2" in exported.metadata["trained"]["note"]
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[k], v)


@pytest.mark.slow
def test_a_pruned_run_starts_from_the_heaviest_channels_of_its_init_model(ray_session, course, tmp_path):
    from fkp_core.model import build_model
    from fkp_core.pruning import prune
    from fkp_core.weights import save_model

    torch.manual_seed(7)
    parent = build_model("mnv2", input_size=64).eval()
    for m in parent.modules():  # batch-norm scales that differ, so that the choice of channels matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 2.0)
    parent_path = save_model(parent, tmp_path / "parent" / "p")
    tiny = [a for a in TINY if a not in ("--model", "tiny")]
    code = _main(train, ["--data", f"course:{course}", "--epochs", "1", "--lr", "1e-12", "--init", parent_path,
                         "--prune", "0.5", "--prune-stride", "4", "--output", tmp_path / "pruned", "--name", "q", *tiny])
    assert code == 0
    child = load_model(tmp_path / "pruned" / "q.pt")
    want = prune(load_model(parent_path).model, 0.5, 4)
    assert child.config.backbone_hidden == want.config.backbone_hidden == (16, 48, 72, *want.config.backbone_hidden[3:])
    assert child.metadata["trained"]["train_config"]["prune"] == 0.5
    for k, v in want.state_dict().items():  # a learning rate too small to move them: the pruned weights themselves
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(child.model.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_dual_run_trains_both_read_outs_from_its_init_models_heatmaps(ray_session, course, tmp_path):
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    torch.manual_seed(3)
    parent_path = save_model(build_model("mnv2", input_size=64, point_sigma=True).eval(), tmp_path / "parent" / "p")
    tiny = [a for a in TINY if a not in ("--model", "tiny")]
    code = _main(train, ["--data", f"course:{course}", "--epochs", "1", "--init", parent_path, "--head", "dual",
                         "--output", tmp_path / "dual", "--name", "q", *tiny])
    assert code == 0
    child = load_model(tmp_path / "dual" / "q.pt")
    assert child.config.head == "dual" and len(child.config.pip_neighbours) == 68 * 10 and child.config.point_sigma
    assert child.metadata["trained"]["train_config"]["head"] == "dual"
    state, parent = child.model.state_dict(), load_model(parent_path).model.state_dict()
    assert state["head.offset.weight"].abs().sum() > 0 and state["head.nb.weight"].abs().sum() > 0  # they start at 0
    assert not torch.equal(state["head.out.weight"], parent["head.out.weight"])  # both read-outs trained
    assert not torch.equal(state["head.cells.weight"], parent["head.out.weight"])
    with torch.no_grad():
        scored = child.model(torch.rand(2, 1, 64, 64), scores=True)
    assert scored.shape == (2, 68, 3) and ((scored[..., 2] >= 0) & (scored[..., 2] <= 1)).all()


@pytest.mark.slow
def test_a_context_run_grows_the_init_models_backbone_and_trains_its_read_out(ray_session, course, tmp_path):
    from fkp_core.model import build_model
    from fkp_core.weights import save_model

    imagenet_weights()
    torch.manual_seed(4)
    parent_path = save_model(build_model("mnv2", input_size=64, point_sigma=True).eval(), tmp_path / "parent" / "p")
    tiny = [a for a in TINY if a not in ("--model", "tiny")]
    code = _main(train, ["--data", f"course:{course}", "--epochs", "1", "--init", parent_path, "--context", "--freeze-stride", "4",
                         "--output", tmp_path / "ctx", "--name", "q", *tiny])
    assert code == 0
    child = load_model(tmp_path / "ctx" / "q.pt")
    assert child.config.context and child.config.point_sigma and child.metadata["trained"]["train_config"]["context"]
    assert child.model.backbone.out_strides[-1] == 32
    assert child.model.head.context.weight.abs().sum() > 0  # it starts at zero


def test_missing_imagenet_weights_are_a_usage_error(course, tmp_path, capsys, monkeypatch):
    import fkp_core.backbones

    def missing(backbone, *_):
        raise fkp_core.backbones.PretrainedError(f"no weights for {backbone}")

    monkeypatch.setattr(fkp_core.backbones, "pretrained_path", missing)
    code = _main(train, ["--data", f"course:{course}", "--model", "mnv2", "--pretrained", "--output", tmp_path, "-q"])
    assert code == 2 and "--pretrained: no weights for mobilenet_v2" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--init", "default", "--context", "--output", tmp_path, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--context grows the --init model's backbone from its ImageNet weights: no weights for mobilenet_v2" in err


def test_pretrained_needs_a_backbone(course, tmp_path, capsys):
    code = _main(train, ["--data", f"course:{course}", "--model", "hm", "--pretrained", "--output", tmp_path, "-q"])
    assert code == 2 and "no pretrained backbone" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "hm", "--freeze-stride", "4", "--output", tmp_path, "-q"])
    assert code == 2 and "--freeze-stride needs a model with a backbone" in capsys.readouterr().err
    code = _main(train, ["--export-checkpoint", "--output", tmp_path, "--storage", tmp_path / "none", "--name", "x", "-q"])
    assert code == 2 and "no checkpoint of run 'x'" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "hm", "--nonface", "0.1", "--output", tmp_path, "-q"])
    assert code == 2 and "--nonface teaches the error head: add --point-sigma" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "base", "--point-sigma", "--output", tmp_path, "-q"])
    assert code == 2 and "--point-sigma needs a heatmap head" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "base", "--head-expand", "64", "--output", tmp_path, "-q"])
    assert code == 2 and "--head-expand widens a heatmap head" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "hm", "--head-expand", "-1", "--output", tmp_path, "-q"])
    assert code == 2 and "--head-expand" in capsys.readouterr().err
    code = _main(train, ["--data", f"course:{course}", "--model", "base", "--head", "dual", "--output", tmp_path, "-q"])
    assert code == 2 and "--head dual reads a heatmap head" in capsys.readouterr().err
