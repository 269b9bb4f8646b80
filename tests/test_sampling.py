from dataclasses import dataclass

import numpy as np
import pytest

from fkp_core.sampling import is_sampled, sample_frames, smoothing_for
from fkp_core.smoothing import OneEuroConfig


@dataclass
class F:
    index: int
    timestamp_s: float


def _frames(timestamps):
    return [F(i, float(t)) for i, t in enumerate(timestamps)]


def test_five_per_second_of_a_30_fps_clip_are_every_sixth_frame():
    frames = _frames(np.arange(100) / 30)
    assert [f.index for f in sample_frames(frames, 5.0)] == list(range(0, 100, 6))
    assert [f.index for f in sample_frames(frames, None)] == list(range(100))


@pytest.mark.parametrize("cuts", [[37, 80], [1, 2, 3, 50], [6, 12, 18]])
def test_segments_choose_the_same_frames_as_one_pass(cuts):
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.01, 0.06, 200))  # variable frame rate
    frames = _frames(times)
    whole = [f.index for f in sample_frames(frames, 4.0)]
    pieces = []
    for a, b in zip([0, *cuts], [*cuts, len(frames)]):
        previous = frames[a - 1].timestamp_s if a else None
        pieces += [f.index for f in sample_frames(frames[a:b], 4.0, previous)]
    assert pieces == whole
    # one frame per quarter second, the first at or after each instant
    for i in whole[1:]:
        assert np.floor(times[i] * 4 + 1e-6) > np.floor(times[i - 1] * 4 + 1e-6)


def test_an_instant_hit_exactly_counts_as_reached():
    assert is_sampled(0.2, 0.1999, 5.0) and not is_sampled(0.3, 0.2, 5.0)
    assert is_sampled(6 / 30, 5 / 30, 5.0)  # 6/30 is 0.2 to the last bit or not: reached either way
    assert is_sampled(0.0, None, 5.0)


def test_a_sampling_step_does_not_restart_smoothing():
    assert smoothing_for(None) == OneEuroConfig()
    assert smoothing_for(1.0).max_gap_s == pytest.approx(1.5)
    assert smoothing_for(30.0).max_gap_s == OneEuroConfig().max_gap_s


@pytest.mark.usefixtures("ray_session")
def test_the_job_samples_five_per_second_with_true_indices_and_timestamps_across_segments(tmp_path):
    """examples/sample.mp4 (25 fps, 320 frames, a face on every frame) at 5 fps, cut into segments of 97 frames."""
    import pandas as pd

    from conftest import PROJECT_ROOT
    from jobs import annotate

    out = tmp_path / "out"
    argv = [str(PROJECT_ROOT / "examples" / "sample.mp4"), "--out", str(out), "--sample-fps", "5", "--segment-frames", "97", "-q"]
    assert annotate.main(argv) == 0
    faces = pd.read_parquet(out).sort_values("frame_index")
    assert faces.frame_index.tolist() == list(range(0, 320, 5))
    np.testing.assert_allclose(faces.timestamp_s.to_numpy(), np.arange(0, 320, 5) / 25.0, atol=1e-6)
    assert faces.track_id.nunique() <= 8  # tracks still follow the face over the sampled frames (8 shots)
    video = pd.read_parquet(out / "_videos.parquet").iloc[0]
    assert (video.status, video.frames_decoded, video.frames_annotated, video.sample_fps, video.segments) == ("ok", 320, 64, 5.0, 4)
