"""The run report: the page from records made here (real frames of examples/sample.mp4, its true keypoints),
the end-of-run hook of jobs.annotate, and the page in a real browser (headless Chromium, marker ``browser``)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import videogen
from conftest import PROJECT_ROOT
from fkp_core.report import REPORT_NAME, ReportConfig, build_report, pick_frames, render_html, write_report
from fkp_core.store import open_output
from fkp_core.tables import FaceColumns, faces_table, videos_table
from fkp_core.video import video_id
from jobs import report as report_job

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"
TRUTH = PROJECT_ROOT / "examples" / "sample_truth.csv"
EVIL = "decoded 100 of 200 frames <script>alert('x')</script> & more"


def truth_columns(frames: range, per_track: int = 40) -> FaceColumns:
    kp = pd.read_csv(TRUTH).iloc[:, 1:].to_numpy(np.float32).reshape(-1, 68, 2)[list(frames)]
    f = np.asarray(frames, np.int64)
    n = len(f)
    return FaceColumns(
        frame_index=f, timestamp_s=f / 25.0, face_index=np.zeros(n, np.int32), track_id=f // per_track,
        boxes=np.tile(np.array([[60, 60, 100, 100]], np.int32), (n, 1)), detected=np.ones(n, bool),
        confidence=np.full(n, 0.9, np.float32), keypoints=kp, keypoints_raw=kp, pose=np.zeros((n, 3), np.float32),
    )


def add_video(out, path: str, status: str, cols: FaceColumns | None, error: str | None = None, frames: int = 320) -> dict:
    vid = video_id(path)
    rec = {"video_id": vid, "path": path, "status": status, "error": error, "frames_expected": frames,
           "frames_decoded": frames if status == "ok" else (0 if status == "failed" else frames // 2),
           "frames_with_faces": 0 if cols is None else len(np.unique(cols.frame_index)),
           "faces": 0 if cols is None else len(cols), "tracks": 0 if cols is None else len(np.unique(cols.track_id)),
           "segments": 1, "seconds": 1.5, "output": None}
    if cols is not None:
        out.write_table(out.part_path(vid), faces_table(vid, path, cols))
        rec["output"] = out.part_path(vid)
    out.write_json(out.status_path(vid), rec)
    return rec


@pytest.fixture(scope="module")
def made_output(tmp_path_factory):
    """ok (8 tracks), partial (2 tracks, a hostile error text), failed, ok without faces, ok whose input is gone."""
    root = tmp_path_factory.mktemp("report") / "run"
    out = open_output(str(root))
    tmp = root.parent
    recs = [
        add_video(out, str(SAMPLE), "ok", truth_columns(range(320))),
        add_video(out, str(tmp / "cut.mp4"), "partial", truth_columns(range(40, 120)), error=EVIL),
        add_video(out, str(tmp / "empty.mp4"), "failed", None, error="moov atom not found"),
        add_video(out, str(tmp / "blank.mp4"), "ok", FaceColumns.empty()),
        add_video(out, str(tmp / "gone.mp4"), "ok", truth_columns(range(0, 80))),
    ]
    shutil.copy(SAMPLE, tmp / "cut.mp4")
    shutil.copy(SAMPLE, tmp / "blank.mp4")
    out.write_table(out.path("_videos.parquet"), videos_table(recs))
    return root, recs


def expected_order(recs: list[dict]) -> list[str]:
    rank = {"failed": 0, "partial": 1, "ok": 2}
    return [r["video_id"] for r in sorted(recs, key=lambda r: (rank[r["status"]], r["path"]))]


def table_ids(page: str) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)"', page)


def images_b64(page: str) -> list[str]:
    return re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)


def images(page: str) -> list[np.ndarray]:
    out = []
    for b64 in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page):
        out.append(cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR))
    return out


def test_page_lists_every_video_failed_and_partial_first_with_bounded_thumbnails(made_output):
    root, recs = made_output
    path = write_report(open_output(str(root)))
    assert path == str(root / REPORT_NAME)
    page = Path(path).read_text()
    assert table_ids(page) == expected_order(recs)
    assert table_ids(page)[:2] == [recs[2]["video_id"], recs[1]["video_id"]]  # failed, then partial
    imgs = images(page)
    assert len(imgs) == 6 * 3 + 2 * 3  # sample: the 6 longest of 8 tracks, 3 frames each; cut: 2 tracks
    assert all(i is not None and i.shape == (112, 112, 3) for i in imgs)
    assert max(len(b) for b in re.findall(r'base64,([^"]+)"', page)) < 16_000  # small JPEGs
    # a thumbnail shows the face with its keypoints drawn in green (viz.GREEN), not a blank or a wrong crop
    green = [((i[:, :, 1] > 180) & (i[:, :, 0] < 140) & (i[:, :, 2] < 140)).mean() for i in imgs]
    assert min(green) > 0.01
    assert "input not readable" in page  # gone.mp4: a note instead of its strip
    assert "2 of 8 tracks" not in page and "6 of 8 tracks shown" in page
    totals = re.search(r"<b>([\d,]+)</b>faces", page).group(1)
    assert int(totals.replace(",", "")) == 320 + 80 + 80


def test_page_is_self_contained_and_escapes_everything(made_output):
    root, _ = made_output
    page = render_html(build_report(open_output(str(root)), ReportConfig(per_track=1, max_tracks=1)))
    assert "<script>alert" not in page and html.escape(EVIL) in page
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', page)  # nothing fetched: data: URIs and anchors only
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert len(images(page)) == 2  # one track, one frame for each of the two videos with frames


def test_thumbnails_are_made_again_only_for_videos_finished_again(made_output, tmp_path):
    root, recs = made_output
    run = tmp_path / "copy"
    shutil.copytree(root, run)
    out = open_output(str(run))
    calls: list[list[str]] = []

    def counting_map(fn, items):
        calls.append([r["video_id"] for r in items])
        return map(fn, items)

    sample, gone = recs[0]["video_id"], recs[4]["video_id"]  # gone: its input cannot be read, so never cached
    first = Path(write_report(out, ReportConfig(quality=81), map_fn=counting_map)).read_text()
    again = Path(write_report(out, ReportConfig(quality=81), map_fn=counting_map)).read_text()
    assert len(calls[0]) == 4 and calls[1] == [gone]  # the second page from the cache (and one more try for gone)
    assert images_b64(again) == images_b64(first) and len(images_b64(first)) == 24
    rec = out.read_json(out.status_path(sample))
    out.write_json(out.status_path(sample), {**rec, "finished_at": "2030-01-01T00:00:00+00:00"})  # finished again
    write_report(out, ReportConfig(quality=81), map_fn=counting_map)
    assert sorted(calls[2]) == sorted([sample, gone])


def test_pick_frames_spreads_over_the_longest_tracks():
    frames = np.concatenate([np.arange(100), np.arange(10, 20), np.arange(50, 53)])
    tracks = np.concatenate([np.zeros(100, int), np.ones(10, int), np.full(3, 7)])
    assert pick_frames(frames, tracks, 3, 2) == {0: [0, 50, 99], 1: [10, 14, 19]}
    assert pick_frames(frames, tracks, 5, 5)[7] == [50, 51, 52]
    assert pick_frames(frames[:0], tracks[:0], 3, 2) == {}


def test_cli_writes_the_page_and_refuses_other_folders(made_output, tmp_path, capsys):
    root, recs = made_output
    (root / REPORT_NAME).unlink(missing_ok=True)
    assert report_job.main([str(root.as_uri()), "--per-track", "1", "--max-tracks", "1", "--max-videos", "1", "-q"]) == 0
    page = (root / REPORT_NAME).read_text()
    assert table_ids(page) == expected_order(recs) and len(images(page)) == 1  # the partial video's strip only
    assert "more video(s) without a strip" in page
    assert len(pd.read_parquet(root)) == 320 + 80 + 80  # the page does not get in the way of the folder as a dataset
    for bad in (tmp_path / "nothing", PROJECT_ROOT / "examples"):
        capsys.readouterr()
        assert report_job.main([str(bad), "-q"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "not an fkp output" in err
    parser = report_job.build_parser()
    assert all((a.help or "").strip() for a in parser._actions) and "(default: None)" not in parser.format_help()


@pytest.mark.usefixtures("ray_session")
def test_annotate_writes_the_report_at_the_end_of_every_run(tmp_path):
    from jobs import annotate

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "good.mp4")
    videogen.zero_byte_file(src / "empty.mp4")
    out = tmp_path / "out"
    assert annotate.main([str(src), "--out", str(out), "--segment-frames", "160", "-q"]) == 1
    page = (out / REPORT_NAME).read_text()
    assert table_ids(page) == [video_id(src / "empty.mp4"), video_id(src / "good.mp4")]  # failed first
    tracks = int(pd.read_parquet(out / "_videos.parquet").set_index("path").loc[str(src / "good.mp4"), "tracks"])
    assert len(images(page)) == 3 * min(tracks, ReportConfig().max_tracks) > 0
    faces = pd.read_parquet(out)
    assert len(faces) > 300  # and the folder still reads as the faces dataset
    from jobs import export  # a real output exports too, whatever columns the tables have gained

    for fmt in ("openface", "csv", "jsonl"):
        assert export.main([str(out), "--format", fmt, "-q"]) == 0
    of = pd.read_csv(out / "_export" / "openface" / f"{video_id(src / 'good.mp4')}.csv", skipinitialspace=True)
    assert len(of) == len(faces) and (of.frame == faces.frame_index + 1).all()
    wide = pd.read_csv(out / "_export" / "csv" / f"{video_id(src / 'good.mp4')}.csv")
    assert len(wide) == len(faces) and np.allclose(wide.x_30, np.stack(faces.keypoints.to_numpy())[:, 60], atol=1e-3)


# ------------------------------------------------------------------------------------------
# in a real browser
# ------------------------------------------------------------------------------------------


def chromium() -> str:
    exe = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if not exe:
        pytest.skip("Chromium not installed (Debian package chromium; .ci/run installs it)")
    return exe


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    proc = subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def page_check(tmp_path: Path, url: str) -> dict:
    """What the page's own script found after the load event: table rows in order, images and how many decoded."""
    dom = run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", url).stdout
    found = re.search(r'<pre id="fkp-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.browser
def test_the_page_in_headless_chromium(made_output, tmp_path):
    root, recs = made_output
    path = write_report(open_output(str(root)))
    url = Path(path).as_uri()
    check = page_check(tmp_path, url)
    assert check["rows"] == expected_order(recs)  # every video, failed and partial first
    assert check["images"] == 24 and check["loaded"] == 24  # every thumbnail decoded (complete, naturalWidth > 0)
    by_faces = page_check(tmp_path, url + "#sort=faces:desc")  # the header sort, run by the browser
    faces = {r["video_id"]: r["faces"] for r in recs}
    assert sorted(by_faces["rows"]) == sorted(check["rows"]) and by_faces["rows"] != check["rows"]
    assert [faces[v] for v in by_faces["rows"]] == sorted(faces.values(), reverse=True)

    shot = tmp_path / "page.png"
    run_chromium(tmp_path, "--window-size=1200,1400", "--hide-scrollbars", f"--screenshot={shot}", url)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1400, 1200)
    assert float(img.std()) > 20  # not blank
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert ((hsv[:, :, 1] > 90) & (hsv[:, :, 2] > 60)).mean() > 0.02  # the thumbnails' colours are on screen
