"""jobs.annotate end to end on one local Ray instance: rows, segments, bad inputs, resume, faults, exit codes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import videogen
from conftest import PROJECT_ROOT
from fkp_core.metrics import nme
from fkp_core.tables import FACE_SCHEMA
from fkp_core.video import read_frames, video_id
from jobs import annotate

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"
TRUTH = PROJECT_ROOT / "examples" / "sample_truth.csv"
SAMPLE_FRAMES = 320
MIN_FACE_FRAMES = 314  # Haar (job defaults) misses the face on a few frames at the start of the last, hardest shot

pytestmark = pytest.mark.usefixtures("ray_session")


def truth() -> np.ndarray:
    return pd.read_csv(TRUTH).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)


def run(*argv) -> int:
    return annotate.main([str(a) for a in argv] + ["-q"])


def faces(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out)


def videos(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "_videos.parquet").set_index("video_id")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The sample clip annotated once with small segments (shared by several tests)."""
    out = tmp_path_factory.mktemp("sample") / "landmarks.parquet"
    assert run(SAMPLE, "--out", out, "--segment-frames", "48") == 0
    return out


def test_every_frame_has_its_face_near_the_truth(sample_run):
    df = faces(sample_run)
    assert len(df) >= MIN_FACE_FRAMES  # one face in (nearly) every frame ...
    assert df.frame_index.is_unique and set(df.frame_index) <= set(range(SAMPLE_FRAMES))  # ... never twice
    kp = np.stack(df.keypoints.to_numpy()).reshape(-1, 68, 2)
    errors = nme(kp, truth()[df.frame_index.to_numpy()])
    assert np.median(errors) < 0.08 and (errors < 0.15).mean() > 0.97
    assert df.timestamp_s.iloc[25] == pytest.approx(1.0)  # 25 fps


def test_segments_cover_each_frame_once_and_tracks_follow_shots(sample_run):
    v = videos(sample_run).iloc[0]
    assert v.status == "ok" and v.segments == 7 and v.frames_decoded == SAMPLE_FRAMES == v.frames_expected
    df = faces(sample_run)
    assert df.frame_index.is_monotonic_increasing and not df.frame_index.duplicated().any()
    # eight shots joined by hard cuts: one track each, stitched across the 48-frame segment edges
    per_shot = df.groupby(df.frame_index // 40).track_id.nunique()
    assert (per_shot == 1).all() and df.track_id.nunique() == 8
    assert not (sample_run / "_segments").exists() or not any((sample_run / "_segments").iterdir())


def test_parquet_schema_and_readers(sample_run):
    files = sorted(sample_run.glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{video_id(SAMPLE)}.parquet"]
    assert pq.read_schema(files[0]).remove_metadata() == FACE_SCHEMA.remove_metadata()
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    n = duckdb.sql(f"select count(*) from read_parquet('{sample_run}/part-*.parquet')").fetchall()[0][0]
    rows = len(faces(sample_run))
    assert n == rows >= MIN_FACE_FRAMES
    assert polars.read_parquet(f"{sample_run}/part-*.parquet").height == rows
    assert len(pq.read_table(sample_run)) == rows  # the folder as a dataset (pandas' route)


def test_rerun_skips_finished_and_overwrite_redoes(sample_run, capsys):
    before = faces(sample_run)
    assert run(SAMPLE, "--out", sample_run, "--segment-frames", "48") == 0
    assert "0 frames annotated this run" in capsys.readouterr().out
    pd.testing.assert_frame_equal(faces(sample_run), before)


def test_input_and_output_as_filesystem_uris(tmp_path):
    """file:// takes the pyarrow route that s3:// and gs:// take: inputs listed and read, tables written."""
    out, src = tmp_path / "uri_out", tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "clip.mp4")
    assert run(src.as_uri(), "--out", out.as_uri(), "--segment-frames", "160") == 0
    v = videos(out).iloc[0]
    assert v.status == "ok" and v.path == (src / "clip.mp4").as_uri() and v.frames_decoded == SAMPLE_FRAMES
    assert len(faces(out)) >= MIN_FACE_FRAMES
    assert run("nosuchscheme://bucket/videos", "--out", tmp_path / "x") == 2


@pytest.mark.parametrize("name", ["fast", "fastest"])
def test_the_fast_bundled_models_by_name(tmp_path, sample_run, name):
    out = tmp_path / name
    assert run(SAMPLE, "--out", out, "--model", name, "--segment-frames", "160") == 0
    assert videos(out).iloc[0].model.startswith(f"fkp_{name} (")
    df = faces(out)
    assert len(df) >= MIN_FACE_FRAMES
    kp = np.stack(df.keypoints.to_numpy()).reshape(-1, 68, 2)
    errors = nme(kp, truth()[df.frame_index.to_numpy()])
    assert np.median(errors) < 0.08 and (errors < 0.15).mean() > 0.97  # the bar the default model meets
    assert not videos(sample_run).iloc[0].model.startswith("fkp_fast")


def test_local_paths_every_node_cannot_see_are_refused(tmp_path, monkeypatch, capsys):
    """The multi-node checks, with real Ray tasks on this (single) node; the node count is faked."""
    from jobs.common import UsageError
    from fkp_core.store import open_output

    gone = str(tmp_path / "only-on-the-driver.mp4")  # as a path on the driver's own disk looks to other nodes
    assert annotate._unseen_on_nodes([str(SAMPLE), gone]) == ([gone], 1)
    monkeypatch.setattr(annotate, "cluster_node_count", lambda: 2)
    annotate._check_inputs_shared([SAMPLE], None)  # seen everywhere: accepted
    with pytest.raises(UsageError, match="only-on-the-driver.mp4.*shared storage"):
        annotate._check_inputs_shared([SAMPLE, Path(gone)], None)
    with pytest.raises(UsageError, match="model.pt"):
        annotate._check_inputs_shared(["s3://bucket/a.mp4"], str(tmp_path / "model.pt"))
    out = open_output(str(tmp_path / "shared_out"))
    out.fs.create_dir(out.root)
    annotate._check_shared(out, "--out")  # a folder every node sees: accepted, and the marker is gone
    assert list((tmp_path / "shared_out").iterdir()) == []


def test_a_damaged_segment_file_is_redone(tmp_path, reference_rows):
    """A segment file an earlier run left damaged (storage trouble) is annotated again, not trusted."""
    from dataclasses import replace

    from fkp_core.video import probe

    src = tmp_path / "clip.mp4"
    shutil.copy(SAMPLE, src)
    out = tmp_path / "out"
    flags = [str(src), "--out", str(out), "--segment-frames", "64"]
    args = annotate.build_parser().parse_args(flags)
    _, output, settings = annotate._check_args(args)
    settings = replace(settings, annotate=replace(settings.annotate, chunk_frames=1))  # as run() sets it without actors
    info = probe(src)
    plan = annotate.VideoPlan(str(src), video_id(src))
    annotate._plan(plan, {"frames": info.frames, "exact": info.frames_exact, "fps": info.fps, "width": info.width,
                          "height": info.height}, output, settings, slots=2)
    damaged = out / "_segments" / video_id(src) / annotate.segment_name(64, 128)
    damaged.write_bytes(b"PAR1 not really parquet")
    assert run(*flags) == 0
    rows = faces(out)
    assert sorted(zip(rows.frame_index, rows.face_index)) == reference_rows("--segment-frames", "64")


def test_bad_inputs_fail_alone_and_exit_1(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "good.mp4")
    videogen.zero_byte_file(src / "empty.mp4")
    videogen.random_bytes_file(src / "noise.mp4")
    videogen.text_file(src / "notes.mp4")
    frames = [f.image for f in read_frames(SAMPLE, 0, 120)]
    fast = videogen.write_clip(tmp_path / "fast.mp4", frames, fps=25, faststart=True)
    videogen.truncated_copy(fast, src / "cut.mp4", 0.5)
    videogen.corrupt_mid_file(fast, src / "broken.mp4")
    out = tmp_path / "out"
    assert run(src, "--out", out, "--segment-frames", "40") == 1
    v = videos(out).set_index("path")
    status = {Path(p).name: s for p, s in v.status.items()}
    assert status["good.mp4"] == "ok"
    for name in ("empty.mp4", "noise.mp4", "notes.mp4"):
        assert status[name] == "failed", name
        assert v.loc[str(src / name), "error"]
    assert status["cut.mp4"] in ("partial", "failed")
    assert status["broken.mp4"] in ("partial", "failed")
    if status["cut.mp4"] == "partial":
        row = v.loc[str(src / "cut.mp4")]
        assert 0 < row.frames_decoded < row.frames_expected and row.error
    assert set(faces(out).video_id) >= {video_id(src / "good.mp4")}
    assert len(faces(out)[faces(out).video_id == video_id(src / "good.mp4")]) >= MIN_FACE_FRAMES


def test_unreadable_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    bad = videogen.unreadable_file(src / "locked.mp4", SAMPLE)
    if not videogen.permissions_enforced(bad):
        pytest.skip("file permissions do not stop this user (root)")
    assert run(src, "--out", tmp_path / "out") == 1
    assert videos(tmp_path / "out").status.tolist() == ["failed"]


def test_still_images_are_one_frame_videos(tmp_path, real_data):
    out = tmp_path / "out"
    render = tmp_path / "render"
    assert run(real_data / "photos" / "udacity_obamas.jpg", "--out", out, "--render", render, "--filter", "sunglasses") == 0
    df = faces(out)
    assert len(df) == 2 and set(df.frame_index) == {0}
    assert len(list(render.glob("*.jpg"))) == 1


def test_render_keeps_frame_count_size_and_fps(tmp_path):
    from fkp_core.video import probe

    out, render = tmp_path / "out", tmp_path / "render"
    assert run(SAMPLE, "--out", out, "--render", render, "--filter", "sunglasses,keypoints", "--segment-frames", "160") == 0
    videos_written = list(render.glob("*.mp4"))
    assert len(videos_written) == 1
    a, b = probe(SAMPLE), probe(videos_written[0])
    assert (b.frames, b.width, b.height, b.fps) == (a.frames, a.width, a.height, a.fps)
    assert videos(out).iloc[0].render == str(videos_written[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope_dir", "--out", "{tmp}/o"], "input not found: nope_dir"),
        (["{tmp}/empty", "--out", "{tmp}/o"], "no videos or images found"),
        (["{sample}", "--out", "/proc/fkp_out"], "not writable"),
        (["{sample}", "--out", "{tmp}/o", "--segment-frames", "0"], "--segment-frames"),
        (["{sample}", "--out", "{tmp}/o", "--filter", "hat"], "unknown filter 'hat'"),
        (["{sample}", "--out", "{tmp}/o", "--model", "{tmp}/missing.pt"], "model file not found"),
        (["{sample}", "--out", "{tmp}/o", "--bogus"], "unrecognized arguments"),
        (["{sample}"], "required: --out"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, sample=SAMPLE) for a in argv]
    try:
        code = annotate.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("part-*"))


def test_nothing_written_outside_out(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "clip.mp4")
    before = {p for p in tmp_path.rglob("*")}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run(src, "--out", tmp_path / "out", "--segment-frames", "160") == 0
    finally:
        os.chdir(cwd)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p == tmp_path / "out" or (tmp_path / "out") in p.parents for p in new), sorted(new)


# ---- faults -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    """Rows of undisturbed runs, per mode: a run with a fault must end with exactly these (frame, face) rows."""
    cache = {}

    def rows(*flags: str) -> list[tuple[int, int]]:
        if flags not in cache:
            out = tmp_path_factory.mktemp("reference") / "out"
            assert run(SAMPLE, "--out", out, *flags) == 0
            cache[flags] = sorted(zip(faces(out).frame_index, faces(out).face_index))
        return cache[flags]

    return rows


def _same_rows(out: Path, expected: list[tuple[int, int]], min_rows: int = MIN_FACE_FRAMES) -> None:
    df = faces(out)
    got = sorted(zip(df.frame_index, df.face_index))
    assert len(set(got)) == len(got), "duplicated rows"
    assert got == expected, f"{len(got)} rows, expected {len(expected)}"
    assert len(expected) >= min_rows


def test_cpu_annotators_get_the_cnn_exported_once_by_the_driver(tmp_path):
    """The driver exports the CNN to ONNX once and hands annotators the bytes; with model actors it exports nothing."""
    import ray

    from fkp_core.onnx_network import ExportedNetwork, OnnxSession
    from jobs.annotate_support import Annotator, NetworkExport, settings_from_args

    args = annotate.build_parser().parse_args([str(SAMPLE), "--out", str(tmp_path / "out")])
    settings = settings_from_args(args)
    ref = NetworkExport(args, settings).ref(n_model=0)
    assert isinstance(ray.get(ref), ExportedNetwork)
    annotator = Annotator(settings)  # the network comes with the calls, not to the constructor (restarts)
    assert annotator.network is None
    assert isinstance(annotator._local_network(ray.get(ref)).predict, OnnxSession)
    assert NetworkExport(args, settings).ref(n_model=1) is None  # model actors run the CNN
    with_actors = annotate.build_parser().parse_args([str(SAMPLE), "--out", str(tmp_path / "out"), "--model-actors", "1"])
    assert NetworkExport(with_actors, settings).thread is None


@pytest.mark.slow
def test_killed_model_actor_loses_and_duplicates_nothing(tmp_path, reference_rows):
    import ray

    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("code", run(SAMPLE, "--out", out, "--segment-frames", "32", "--model-actors", "1")))
    job.start()
    killed = False
    deadline = time.time() + 120
    while job.is_alive() and time.time() < deadline and not killed:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("fkp-model-")]
        seg_dir = out / "_segments"
        written = list(seg_dir.rglob("*-*.parquet")) if seg_dir.exists() else []
        if names and len(written) >= 2:
            actor = ray.get_actor(names[0], namespace=annotate.ACTOR_NAMESPACE)
            pid = ray.get(actor.stats.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    job.join(timeout=300)
    assert killed, "the job finished before the actor could be killed"
    assert result.get("code") == 0
    # with actors frames go in chunks, detected on every frame, without tracking to bridge Haar's misses
    _same_rows(out, reference_rows("--segment-frames", "32", "--model-actors", "1"), min_rows=300)


def _segment_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::run_segment"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_killed_segment_worker_is_retried(tmp_path, reference_rows):
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("code", run(SAMPLE, "--out", out, "--segment-frames", "64")))
    job.start()
    killed = False
    deadline = time.time() + 120
    while job.is_alive() and time.time() < deadline and not killed:
        pids = _segment_worker_pids()
        if pids:
            time.sleep(0.3)  # let it get into its frames
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed, "no segment worker was seen running"
    assert result.get("code") == 0
    _same_rows(out, reference_rows("--segment-frames", "64"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed-driver"])
def test_interrupted_driver_then_rerun_finishes_exactly_once(tmp_path, sig, reference_rows):
    """A separate driver process (its own local Ray) is interrupted mid-run; the rerun completes."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        shutil.copy(SAMPLE, src / f"clip{i}.mp4")
    out = tmp_path / "out"
    env = {**os.environ, "FKP_RAY_TEMP_DIR": f"/tmp/fkp-rt-{os.getpid()}-{sig}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.annotate", str(src), "--out", str(out), "--segment-frames", "32", "--num-cpus", "1", "-q"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        seg = out / "_segments"
        if seg.exists() and len(list(seg.rglob("*-*.parquet"))) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code in ((130, 2) if sig == signal.SIGINT else (-signal.SIGKILL,)), code
    assert run(src, "--out", out, "--segment-frames", "32") == 0
    df = faces(out)
    expected = reference_rows("--segment-frames", "32")
    for i in range(3):
        rows = df[df.video_id == video_id(src / f"clip{i}.mp4")]
        got = sorted(zip(rows.frame_index, rows.face_index))
        assert got == expected, f"clip{i}: {len(got)} rows, expected {len(expected)}"
    assert len(videos(out)) == 3 and (videos(out).status == "ok").all()
