"""jobs.annotate hardening (issue 18): a re-run with nothing to do, progress within segments, output folders that
are shared or reused, inputs that are odd files, honest per-video columns, rotated video."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import PROJECT_ROOT
from fkp_core.video import video_id
from jobs import annotate

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"
SAMPLE_FRAMES = 320

pytestmark = pytest.mark.usefixtures("ray_session")


def run(*argv, quiet: bool = True) -> int:
    return annotate.main([str(a) for a in argv] + (["-q"] if quiet else []))


def videos(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "_videos.parquet")


def _refuse_ray(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(annotate, "init_ray", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A copy of the sample clip annotated once: (input folder, out)."""
    root = tmp_path_factory.mktemp("finished")
    src = root / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "clip.mp4")
    out = root / "out"
    assert run(src, "--out", out, "--segment-frames", "160") == 0
    return src, out


# ---- (b) a job that answers at once ------------------------------------------------------------


def test_rerun_with_nothing_left_to_do_starts_no_ray(finished, monkeypatch, capsys):
    src, out = finished
    before = pd.read_parquet(out)
    _refuse_ray(monkeypatch)
    assert run(src, "--out", out, "--segment-frames", "160") == 0
    assert "1 input(s): 1 ok, 0 partial, 0 failed; 0 frames annotated this run" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(out), before)


def test_a_segment_reports_frames_as_it_goes(tmp_path):
    """A segment tells its progress callback (the annotator's: the progress actor) its frame count every
    PROGRESS_EVERY frames, not once at the end."""
    from fkp_core.records import Segment
    from fkp_core.segments import annotate_segment, load_network

    calls = []
    args = annotate.build_parser().parse_args([str(SAMPLE), "--out", str(tmp_path / "out")])
    _, _, settings = annotate._check_args(args)
    result, _ = annotate_segment(load_network(settings.model), str(SAMPLE), Segment(40, 100), (320, 320), settings,
                                 on_progress=calls.append)
    assert result.frames == 60
    assert calls == list(range(10, 61, 10))


def test_the_progress_bar_moves_within_a_segment(tmp_path, capsys):
    """One segment of 320 frames: the bar shows counts between 0 and 320 (before, it jumped from 0 to 320)."""
    assert run(SAMPLE, "--out", tmp_path / "out", "--segment-frames", "320", quiet=False) == 0
    shown = {int(n) for n in re.findall(r"\b(\d+)/320\b", capsys.readouterr().err)}
    assert shown & set(range(1, SAMPLE_FRAMES)), sorted(shown)


# ---- (d) output folders shared or reused -----------------------------------------------------------


def _clip(path: Path, frames: int, start: int = 0) -> Path:
    import videogen
    from fkp_core.video import read_frames

    return videogen.write_clip(path, [f.image for f in read_frames(SAMPLE, start, start + frames)], fps=25)


def test_an_input_replaced_at_the_same_path_is_redone(tmp_path, capsys):
    import os

    src = tmp_path / "in"
    src.mkdir()
    clip = _clip(src / "clip.mp4", 60)
    out = tmp_path / "out"
    assert run(src, "--out", out) == 0
    record = videos(out).iloc[0]
    assert record.frames_decoded == 60
    first = capsys.readouterr().out
    assert "changed" not in first
    _clip(src / "clip.mp4", 90, start=120)  # another recording, same name
    os.utime(clip, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert run(src, "--out", out) == 0
    summary = capsys.readouterr().out
    assert "1 input(s) changed since they were finished here, so annotated again" in summary
    assert "90 frames annotated this run" in summary
    v = videos(out)
    assert len(v) == 1 and v.iloc[0].frames_decoded == 90
    assert set(pd.read_parquet(out).frame_index) <= set(range(90)) and pd.read_parquet(out).frame_index.max() > 60
    assert run(src, "--out", out) == 0  # and now it is finished: nothing to do
    assert "0 frames annotated this run" in capsys.readouterr().out


def test_render_inside_an_input_folder_is_never_an_input(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _clip(src / "clip.mp4", 40)
    out, render = src / "landmarks", src / "annotated"
    for _ in range(2):  # the documented re-run must not take the rendered video as a new input
        assert run(src, "--out", out, "--render", render) == 0
        assert capsys.readouterr().out.startswith("1 input(s): 1 ok")
    assert len(list(render.glob("*.mp4"))) == 1
    assert videos(out).path.tolist() == [str(src / "clip.mp4")]


def _lock(out: Path, pid: int, started: int | None) -> None:
    import json
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / "_lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "pid_started": started,
                                                "since": "2026-12-02T00:00:00+00:00", "command": "python -m jobs.annotate ..."}))


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_owner_leaves_no_stuck_lock(tmp_path, capsys):
    import subprocess

    from jobs.common import OutputLock

    src = tmp_path / "in"
    src.mkdir()
    _clip(src / "clip.mp4", 30)
    out = tmp_path / "out"
    other = subprocess.Popen(["sleep", "600"])  # stands for a run that is still going
    try:
        _lock(out, other.pid, OutputLock._started(other.pid))
        assert run(src, "--out", out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is in use by another run (PID {other.pid}" in err, err
        assert not (out / "_status").exists()  # it did nothing
    finally:
        other.kill()
        other.wait()
    assert run(src, "--out", out) == 0  # the owner is gone: its lock is taken over
    assert not (out / "_lock.json").exists()  # and released at the end
    _lock(out, other.pid, 12345)  # a lock whose PID now belongs to another process (or none): stale too
    assert run(src, "--out", out) == 0 and not (out / "_lock.json").exists()


def test_no_empty_segments_folder_is_left(finished):
    _, out = finished
    assert not (out / "_segments").exists()


# ---- (c) odd files among the inputs -------------------------------------------------------------------


def test_a_symlink_loop_gets_a_row_and_a_folder_named_like_a_video_a_message(tmp_path, caplog):
    import logging
    import os

    src = tmp_path / "in"
    src.mkdir()
    _clip(src / "good.mp4", 20)
    os.symlink("b.mp4", src / "a.mp4")
    os.symlink("a.mp4", src / "b.mp4")
    os.symlink("nowhere.mp4", src / "dangling.mp4")
    (src / "x.mp4").mkdir()
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fkp"):
        assert run(src, "--out", out) == 1
    v = videos(out).set_index("path")
    assert v.loc[str(src / "good.mp4"), "status"] == "ok"
    for name in ("a.mp4", "b.mp4"):
        assert v.loc[str(src / name), "status"] == "failed"
        assert "symbolic link loop" in v.loc[str(src / name), "error"]
    assert "broken symbolic link" in v.loc[str(src / "dangling.mp4"), "error"]
    assert len(v) == 4
    assert any(f"{src / 'x.mp4'} is a folder, not a video" in r.getMessage() for r in caplog.records), caplog.text


# ---- (e) honest columns ----------------------------------------------------------------------------------


def test_seconds_counts_cpu_time_not_time_spent_waiting(tmp_path):
    """A segment that waits (a busy machine, a slow store) spends no CPU meanwhile: `seconds` leaves it out."""
    import time
    from dataclasses import replace

    from fkp_core.records import Segment, VideoPlan, VideoProbe
    from fkp_core.segments import annotate_segment, finish_stored, load_network

    args = annotate.build_parser().parse_args([str(SAMPLE), "--out", str(tmp_path / "out")])
    _, out, settings = annotate._check_args(args)
    network = load_network(settings.model)
    waited = []

    def predict(crops):
        if not waited:
            waited.append(2.0)
            time.sleep(2.0)
        return network.predict(crops)

    vid = video_id(SAMPLE)
    result, cols = annotate_segment(replace(network, predict=predict), str(SAMPLE), Segment(0, 40), (320, 320), settings)
    assert waited and result.seconds_total >= 2.0
    assert result.cpu_seconds <= result.seconds_total - 1.5
    out.write_segment(vid, str(SAMPLE), result, cols)
    plan = VideoPlan(str(SAMPLE), vid, VideoProbe(frames=SAMPLE_FRAMES, fps=25.0, width=320, height=320), segments=[Segment(0, 40)])
    record = finish_stored(out, plan, settings)
    assert 0 < record.seconds <= result.seconds_total - 1.5


def _vfr_clip(path: Path) -> tuple[Path, list[float]]:
    """60 frames of the sample clip at 30 fps, with ten of them 10 ms apart (a screen recording's burst)."""
    import videogen
    from fkp_core.video import read_frames

    times, t = [], 0.0
    for i in range(60):
        times.append(t)
        t += 0.010 if 20 <= i < 30 else 1 / 30
    return videogen.write_clip(path, [f.image for f in read_frames(SAMPLE, 0, 60)], fps=30, times=times), times


def test_variable_frame_rate_frame_index_is_decoding_order(tmp_path):
    from fkp_core.video import probe, read_frames

    clip, times = _vfr_clip(tmp_path / "screen.mp4")
    assert probe(clip).variable_rate and not probe(SAMPLE).variable_rate
    got = [(f.index, f.timestamp_s) for f in read_frames(clip, sequential=True)]
    assert [i for i, _ in got] == list(range(60))
    assert [t for _, t in got] == pytest.approx(times, abs=1e-3)
    out = tmp_path / "out"
    assert run(clip, "--out", out, "--segment-frames", "20") == 0
    v = videos(out).iloc[0]
    assert v.frames_decoded == v.frames_expected == 60 and v.segments == 1
    df = pd.read_parquet(out)
    assert df.frame_index.is_unique and set(df.frame_index) <= set(range(60)) and len(df) >= 55
    assert df.timestamp_s.to_numpy() == pytest.approx([times[i] for i in df.frame_index], abs=1e-3)


# ---- (f) rotated video -------------------------------------------------------------------------------------


def test_a_rotated_phone_video_is_annotated_and_rendered_upright(tmp_path):
    """Stored sideways with a 90-degree display rotation, as phones store portrait video: the job sees the frames
    a player shows, keypoints are in those coordinates, the table says so, and --render writes them upright."""
    import cv2
    import numpy as np

    import videogen
    from fkp_core.metrics import nme
    from fkp_core.video import probe, read_frames

    upright = [f.image for f in read_frames(SAMPLE, 0, 60)]
    stored = [cv2.rotate(img[:, 40:]  # 280 wide, 320 high: not square, so a wrong orientation cannot pass
                         , cv2.ROTATE_90_CLOCKWISE) for img in upright]
    clip = videogen.write_clip(tmp_path / "phone.mp4", stored, fps=25, rotation=90)
    assert probe(clip).rotation == 90 and (probe(clip).width, probe(clip).height) == (320, 280)
    out, render = tmp_path / "out", tmp_path / "render"
    assert run(clip, "--out", out, "--render", render, "--filter", "box") == 0
    v = videos(out).iloc[0]
    assert (v.width, v.height, v.rotation) == (280, 320, 90)
    df = pd.read_parquet(out)
    assert df.frame_index.nunique() >= 55
    truth = pd.read_csv(PROJECT_ROOT / "examples" / "sample_truth.csv").iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)
    truth = truth - np.float32([40, 0])  # the crop above
    kp = np.stack(df.keypoints.to_numpy()).reshape(-1, 68, 2)
    assert np.median(nme(kp, truth[df.frame_index.to_numpy()])) < 0.08
    rendered = next(iter(render.glob("*.mp4")))
    info = probe(rendered)
    assert (info.width, info.height, info.rotation, info.frames) == (280, 320, 0, 60)
    first = next(iter(read_frames(rendered, 10, 11))).image.astype(np.float32)
    assert np.abs(first - upright[10][:, 40:].astype(np.float32)).mean() < 12  # the upright picture (+ a box)
