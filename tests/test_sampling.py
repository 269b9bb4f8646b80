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


@pytest.mark.parametrize("bframes", [0, 2])
@pytest.mark.parametrize("cuts", [[], [97, 205]])
def test_sparse_sampling_seeks_over_short_gops_and_picks_the_same_frames(tmp_path, bframes, cuts):
    """A 30 fps clip with a keyframe every 10 frames, sampled at 1 fps, whole or in segments: reading with
    skip_until (seeking to the keyframe before each sampled frame) gives exactly the frames, indices and
    timestamps of decoding everything, and decodes far fewer frames."""
    from videogen import moving_square_clip, read_stamp

    from fkp_core.sampling import skip_until
    from fkp_core.video import DecodeStats, read_frames

    clip = moving_square_clip(tmp_path / "gop10.mp4", n=300, fps=30, gop=10, bframes=bframes)
    bounds = list(zip([0, *cuts], [*cuts, None]))
    full, sparse = [], []
    full_decoded = sparse_decoded = accounted = 0
    for a, b in bounds:
        first = max(0, a - 1)  # as the annotate job reads a segment: from the frame before it
        for reader, out in ((None, full), (skip_until(1.0), sparse)):
            st = DecodeStats()
            frames = list(read_frames(clip, first, b, gray=True, stats=st, skip_until=reader))
            previous = [f.timestamp_s for f in frames if f.index < a]
            picked = sample_frames([f for f in frames if f.index >= a], 1.0, previous[-1] if previous else None)
            out += [(f.index, f.timestamp_s, read_stamp(f.image)) for f in picked]
            if reader is None:
                full_decoded += st.decoder_frames
            else:
                sparse_decoded += st.decoder_frames
                accounted += st.decoded + st.skipped - (1 if a else 0)
                assert st.gaps == 0 and st.duplicates == 0 and not st.errors
    assert [i for i, _, _ in full] == list(range(0, 300, 30))
    assert sparse == full
    assert all(i == stamp for i, _, stamp in sparse)  # the pixels are those of the frame the index names
    np.testing.assert_allclose([t for _, t, _ in sparse], np.arange(0, 300, 30) / 30, atol=1e-6)
    assert accounted == 300  # every frame delivered or counted as skipped: no frame looks missing
    assert full_decoded >= 300 and sparse_decoded < full_decoded / 2


def test_sampling_without_short_gops_decodes_everything_and_picks_the_same_frames(tmp_path):
    """Keyframes farther apart than the sampling step: no seek, the same frames as a full decode."""
    from fkp_core.sampling import skip_until
    from fkp_core.video import DecodeStats, read_frames
    from videogen import moving_square_clip

    clip = moving_square_clip(tmp_path / "gop250.mp4", n=120, fps=25, gop=250, bframes=2)
    full = [(f.index, f.timestamp_s) for f in sample_frames(read_frames(clip, 0, None, gray=True), 5.0)]
    st = DecodeStats()
    sparse = [(f.index, f.timestamp_s) for f in sample_frames(read_frames(clip, 0, None, gray=True, stats=st, skip_until=skip_until(5.0)), 5.0)]
    assert sparse == full and [i for i, _ in full] == list(range(0, 120, 5))
    assert st.seeks == 0 and st.decoder_frames == 120 and st.decoded + st.skipped == 120
    assert skip_until(None) is None


@pytest.mark.usefixtures("ray_session")
def test_the_job_samples_a_short_gop_clip_at_one_per_second_like_a_full_decode(tmp_path):
    """examples/sample.mp4 re-encoded with a keyframe every 10 frames (the job then seeks between sampled frames),
    at 1 fps in segments of 97 frames: the frames of one per second, with true indices and timestamps, and
    every frame accounted for (status ok, frames_decoded 320)."""
    import pandas as pd

    from conftest import PROJECT_ROOT
    from fkp_core.video import read_frames
    from jobs import annotate
    from videogen import write_clip

    clip = write_clip(tmp_path / "sample_gop10.mp4", (f.image for f in read_frames(PROJECT_ROOT / "examples" / "sample.mp4")),
                      fps=25, gop=10, bframes=2)
    out = tmp_path / "out"
    assert annotate.main([str(clip), "--out", str(out), "--sample-fps", "1", "--segment-frames", "97", "-q"]) == 0
    faces = pd.read_parquet(out).sort_values("frame_index")
    assert faces.frame_index.tolist() == list(range(0, 320, 25))
    np.testing.assert_allclose(faces.timestamp_s.to_numpy(), np.arange(0, 320, 25) / 25.0, atol=1e-6)
    video = pd.read_parquet(out / "_videos.parquet").iloc[0]
    assert (video.status, video.frames_decoded, video.frames_annotated, video.segments) == ("ok", 320, 13, 4)
