"""jobs.bench annotate: the figures it saves, and each ratio tied to a decode-only figure of its own."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import PROJECT_ROOT
from jobs import bench

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"

pytestmark = pytest.mark.usefixtures("ray_session")


def test_annotate_bench_saves_fps_ratios_and_stages(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    shutil.copy(SAMPLE, clip)
    out = tmp_path / "bench.json"
    assert bench.main(["annotate", str(clip), "--detect-every", "1,10", "--json", str(out), "--extra=--model fast", "-q"]) == 0
    saved = json.loads(out.read_text())
    entry = saved["results"][0]
    assert entry["frames"] == 320 and entry["size"] == [320, 320] and len(entry["runs"]) == 2
    for run, k in zip(entry["runs"], (1, 10)):
        assert run["detect_every"] == k and run["exit_code"] == 0 and run["faces"] >= 314
        assert run["fps"] == pytest.approx(320 / run["wall_s"])
        assert run["ratio_to_decode_only"] == pytest.approx(run["fps"] / run["decode_only_fps"])  # its own decode-only run
        assert set(run["stage_ms_per_frame"]) == {"decode", "detect", "cnn", "other", "post"}
    assert entry["decode_only_fps"] in [r["decode_only_fps"] for r in entry["runs"]]
    # Haar on every frame runs the detector 320 times, K = 10 about 32 + a few: the detect stage shows it
    per_frame = [r["stage_ms_per_frame"]["detect"] for r in entry["runs"]]
    assert per_frame[1] < per_frame[0] / 2
    assert "--model fast" in saved["command"]
    assert "x decode-only" in capsys.readouterr().out


def test_annotate_bench_compares_flag_variants_in_one_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["annotate", str(SAMPLE), "--detect-every", "10", "--variant", "", "--variant", "--no-mirror --no-smooth",
                       "--json", str(out), "--extra=--model fastest", "-q"]) == 0
    runs = json.loads(out.read_text())["results"][0]["runs"]
    assert [r["variant"] for r in runs] == ["", "--no-mirror --no-smooth"]
    assert all(r["exit_code"] == 0 and r["faces"] >= 314 for r in runs)
    assert "detect-every 10, --no-mirror --no-smooth:" in capsys.readouterr().out
    assert bench.main(["annotate", str(SAMPLE), "--variant=--no-such-flag", "-q"]) == 2


def test_detector_bench_counts_faces_by_threshold(tmp_path, real_data):
    """The sample clip (one face on each of its 320 frames) and drawn course faces, through `jobs.bench detector`."""
    from conftest import make_course_dataset

    out = tmp_path / "det.json"
    data = make_course_dataset(tmp_path / "course", n=6)
    assert bench.main(["detector", str(SAMPLE), "--data", f"course:{data}", "--every", "1", "--thresholds", "0.5,0.99",
                       "--json", str(out), "-q"]) == 0
    (entry,) = json.loads(out.read_text())["results"]
    counts = entry["clips"]["sample.mp4"]
    assert counts["0.5"] == {"faces": 320, "most_in_a_frame": 1}
    assert counts["0.99"]["faces"] < 320  # a stricter threshold keeps fewer
    assert set(entry["labelled_found"]) == {"0.5", "0.99"}
    assert bench.main(["detector", str(SAMPLE), "--data", f"ibug:{real_data / '300w' / 'afw'}", "-q"]) == 2  # never AFW
