"""fkp_core.video: probe, exact frame ranges (vs sequential decoding), bad inputs, writer, inputs."""

from __future__ import annotations

import pickle
import re
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from fkp_core.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DecodeStats,
    VideoError,
    VideoWriter,
    find_media,
    h264_available,
    probe,
    read_frames,
    video_id,
)
from videogen import (
    corrupt_mid_file,
    moving_square_clip,
    moving_square_frames,
    permissions_enforced,
    random_bytes_file,
    read_stamp,
    text_file,
    truncated_copy,
    unreadable_file,
    write_clip,
    zero_byte_file,
)

N = 90  # frames in the main clip: GOP 12 with 2 B-frames, so keyframes at 0, 12, 24, ...


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="module")
def bclip(clips) -> Path:
    return moving_square_clip(clips / "bframes.mp4", n=N, gop=12, bframes=2)


def sequential(path: Path, gray: bool = True) -> list[tuple[int, np.ndarray]]:
    """The reference: a plain PyAV decode from the start, numbered by a counter (no seeking, no pts)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [(i, f.to_ndarray(format="gray" if gray else "bgr24")) for i, f in enumerate(c.decode(s))]


@pytest.fixture(scope="module")
def reference(bclip) -> list[tuple[int, np.ndarray]]:
    return sequential(bclip)


def assert_same(got, expected) -> None:
    assert [g.index for g in got] == [i for i, _ in expected]
    for g, (i, img) in zip(got, expected):
        assert np.array_equal(g.image, img), f"frame {i} differs"


# ---- probe -----------------------------------------------------------------------------------------

def test_probe_generated_clip(bclip):
    info = probe(bclip)
    assert (info.frames, info.width, info.height, info.codec) == (N, 160, 120, "h264")
    assert info.fps == 30.0 and info.rate == Fraction(30)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    assert info.frames_exact and not info.is_image and info.rotation == 0
    assert info.display_size == (160, 120)
    assert pickle.loads(pickle.dumps(info)) == info


def test_probe_estimated_count_and_ntsc_rate(clips):
    mkv = moving_square_clip(clips / "ntsc.mkv", n=60, fps=Fraction(30000, 1001))
    info = probe(mkv)
    assert info.rate == Fraction(30000, 1001) and info.fps == pytest.approx(29.97, abs=1e-3)
    assert not info.frames_exact and abs(info.frames - 60) <= 1  # duration * fps: an estimate
    counted = probe(mkv, count_frames=True)
    assert counted.frames_exact and counted.frames == 60
    assert len(list(read_frames(mkv))) == 60


# ---- read_frames -------------------------------------------------------------------------------------

def test_sequential_read_is_numbered_like_the_stamps(bclip, reference):
    frames = list(read_frames(bclip, gray=True))
    assert_same(frames, reference)
    assert [read_stamp(f.image) for f in frames] == list(range(N))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / 30 for i in range(N)])
    index, ts, image = frames[5]  # unpacks as a tuple
    assert (index, image.shape, image.dtype) == (5, (120, 160), np.uint8)


@pytest.mark.parametrize("start,end", [
    (0, 5), (5, 17), (11, 13), (12, 24), (13, 14), (35, 70), (47, 49), (40, 41), (60, 84),
    (80, 200), (89, None), (30, None), (90, 100), (500, 600), (30, 30),
])
def test_range_equals_sequential_decode(bclip, reference, start, end):
    stats = DecodeStats()
    got = list(read_frames(bclip, start, end, gray=True, stats=stats))
    expected = [r for r in reference if r[0] >= start and (end is None or r[0] < end)]
    assert_same(got, expected)
    assert stats.decoded == len(expected) and stats.gaps == 0 and stats.duplicates == 0 and not stats.errors
    assert stats.missing(N) == 0
    if start >= 30 and got:  # past 1 s the reader seeks instead of decoding from the start
        assert stats.seeks >= 1 and not stats.sequential


def test_colour_range_equals_sequential_decode(bclip):
    ref = sequential(bclip, gray=False)
    got = list(read_frames(bclip, 37, 53))
    assert_same(got, ref[37:53])
    assert got[0].image.shape == (120, 160, 3)


def test_segments_partition_the_video(bclip):
    """Fixed-size segments, as the job plans them, give every frame exactly once."""
    indices = [f.index for s in range(0, N, 25) for f in read_frames(bclip, s, s + 25 if s + 25 < N else None)]
    assert indices == list(range(N))


@pytest.mark.parametrize("name,kwargs", [
    ("open_gop.mp4", dict(bframes=3, options={"x264-params": "open-gop=1"})),  # leading B-frames
    ("mpeg4.avi", dict(codec="mpeg4")),  # AVI indexes by decode time: seeks land late
    ("h264.ts", dict()),  # MPEG-TS seeks are approximate
    ("h264.mkv", dict()),  # millisecond timestamps
    ("ntsc.mp4", dict(fps=Fraction(30000, 1001))),
])
def test_ranges_in_other_containers(clips, name, kwargs):
    path = moving_square_clip(clips / name, n=72, gop=12, **{"bframes": 2, **kwargs})
    ref = sequential(path)
    assert len(ref) == 72
    for start, end in [(0, 72), (35, 37), (47, 49), (59, 72), (71, None)]:
        got = list(read_frames(path, start, end, gray=True))
        assert_same(got, ref[start:end])
        assert [read_stamp(g.image) for g in got] == [g.index for g in got]


def test_variable_frame_rate_maps_onto_the_grid(clips):
    """A frame 2/30 s after the previous leaves a gap; one 0.4/30 s after it collides and is dropped."""
    times = sorted([i / 30 for i in range(40) if i != 10] + [19.4 / 30])
    path = write_clip(clips / "vfr.mp4", moving_square_frames(len(times)), times=times)
    stats = DecodeStats()
    frames = list(read_frames(path, gray=True, stats=stats))
    assert (stats.decoded, stats.gaps, stats.duplicates) == (39, 1, 1)
    index_of_stamp = {read_stamp(f.image): f.index for f in frames}
    assert index_of_stamp[9] == 9 and index_of_stamp[10] == 11 and 19 not in index_of_stamp
    assert index_of_stamp[18] == 19 and index_of_stamp[20] == 20
    by_segments = [f.index for s in range(0, 40, 8) for f in read_frames(path, s, s + 8)]
    assert by_segments == [f.index for f in frames]  # still every frame exactly once


def test_stream_without_timestamps_is_counted(clips):
    raw = moving_square_clip(clips / "raw.h264", n=40)
    info = probe(raw)
    assert info.frames == 40 and info.frames_exact  # no duration: packets are counted
    stats = DecodeStats()
    got = list(read_frames(raw, 30, 35, gray=True, stats=stats))
    assert [g.index for g in got] == [read_stamp(g.image) for g in got] == list(range(30, 35))
    assert stats.sequential


def test_limited_range_luma_conversion_equals_the_table():
    from fkp_core.video import _LIMITED_TO_FULL, _limited_to_full

    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(_limited_to_full(every[None]), _LIMITED_TO_FULL[None])
    frame = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)[:, 3:50]  # a strided view, as from a plane
    assert np.array_equal(_limited_to_full(frame), _LIMITED_TO_FULL[frame])


def test_gray_is_ffmpeg_gray_and_close_to_bgr(bclip, reference):
    colour = {f.index: f.image for f in read_frames(bclip, 20, 30)}
    for f in read_frames(bclip, 20, 30, gray=True):
        assert np.array_equal(f.image, reference[f.index][1])  # == PyAV's to_ndarray(format="gray")
        diff = np.abs(f.image.astype(int) - cv2.cvtColor(colour[f.index], cv2.COLOR_BGR2GRAY))
        assert diff.mean() < 3


def test_rotation_reported_and_applied(clips):
    path = write_clip(clips / "rot.mp4", moving_square_frames(6), rotation=90)
    info = probe(path)
    assert info.rotation == 90 and info.display_size == (120, 160)
    stored = next(iter(read_frames(path, 2, 3))).image
    upright = next(iter(read_frames(path, 2, 3, upright=True))).image
    assert stored.shape == (120, 160, 3) and upright.shape == (160, 120, 3)
    assert np.array_equal(upright, cv2.rotate(stored, cv2.ROTATE_90_COUNTERCLOCKWISE))


def test_still_images_are_one_frame_videos(clips):
    img = next(iter(moving_square_frames(1, 64, 48)))
    for name in ("still.jpg", "still.PNG"):
        cv2.imwrite(str(clips / name), img)
    (clips / "jpeg_named.mp4").write_bytes((clips / "still.jpg").read_bytes())
    for name in ("still.jpg", "still.PNG", "jpeg_named.mp4"):
        info = probe(clips / name)
        assert (info.is_image, info.frames, info.fps, info.width, info.height) == (True, 1, 0.0, 64, 48)
        frames = list(read_frames(clips / name, gray=True))
        assert len(frames) == 1 and frames[0].index == 0 and frames[0].image.shape == (48, 64)
        assert next(iter(read_frames(clips / name))).image.shape == (48, 64, 3)
        assert list(read_frames(clips / name, 1, 5)) == []


def test_bad_range_arguments(bclip):
    with pytest.raises(ValueError):
        read_frames(bclip, -1, 5)
    with pytest.raises(ValueError):
        read_frames(bclip, 10, 5)


# ---- bad inputs ----------------------------------------------------------------------------------

def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("kind,reason", [
    ("missing", "file not found"),
    ("zero", "empty file"),
    ("random", "not a video"),
    ("text", "not a video"),
    ("directory", "directory"),
    ("audio", "no video stream"),
    ("truncated_moov_at_end", "not a video"),  # the index (moov) was in the lost part
])
def test_bad_inputs_raise_video_error(tmp_path, bclip, kind, reason):
    path = {
        "missing": lambda: tmp_path / "nope.mp4",
        "zero": lambda: zero_byte_file(tmp_path / "zero.mp4"),
        "random": lambda: random_bytes_file(tmp_path / "random.mp4"),
        "text": lambda: text_file(tmp_path / "text.mp4"),
        "directory": lambda: (tmp_path / "folder.mp4").mkdir() or tmp_path / "folder.mp4",
        "audio": lambda: _audio_only(tmp_path / "audio.m4a"),
        "truncated_moov_at_end": lambda: truncated_copy(bclip, tmp_path / "cut.mp4", 0.6),
    }[kind]()
    for call in (lambda: probe(path), lambda: read_frames(path, 0, 10)):  # read_frames fails at the call
        with pytest.raises(VideoError) as err:
            call()
        assert reason in str(err.value) and err.value.reason in str(err.value)
        assert str(err.value).startswith(str(path)) and err.value.path == str(path)
    clone = pickle.loads(pickle.dumps(err.value))  # Ray ships exceptions between processes
    assert str(clone) == str(err.value) and clone.path == err.value.path


def test_unreadable_file(tmp_path, bclip):
    path = unreadable_file(tmp_path / "locked.mp4", bclip)
    try:
        if not permissions_enforced(path):
            pytest.skip("file permissions do not stop this user (root)")
        with pytest.raises(VideoError, match="permission denied"):
            probe(path)
    finally:
        path.chmod(0o644)


def test_truncated_file_ends_early_and_says_so(tmp_path):
    full = moving_square_clip(tmp_path / "fs.mp4", n=N, faststart=True)  # index first, as on the web
    cut = truncated_copy(full, tmp_path / "cut.mp4", 0.6)
    info = probe(cut)
    assert info.frames == N  # the container still promises them all
    stats = DecodeStats()
    got = list(read_frames(cut, 0, None, gray=True, on_error="skip", stats=stats))
    assert 0 < stats.decoded == len(got) < N and stats.eof and stats.missing(info.frames) == N - len(got)
    assert [g.index for g in got] == [read_stamp(g.image) for g in got] == list(range(len(got)))
    past = DecodeStats()
    assert list(read_frames(cut, 80, N, on_error="skip", stats=past)) == []
    assert past.eof and past.missing(info.frames) == 10


def test_corrupt_mid_file_raises_naming_the_last_good_frame(tmp_path, bclip, reference):
    bad = corrupt_mid_file(bclip, tmp_path / "corrupt.mp4")
    assert probe(bad).frames == N  # the index is intact: only the coded pictures are damaged
    got = []
    with pytest.raises(VideoError, match=r"decoding error after frame \d+") as err:
        for f in read_frames(bad, gray=True):
            got.append(f)
    last = err.value.last_good_index
    assert last is not None and 0 < last < N - 1 and got[-1].index == last
    assert_same(got, reference[: last + 1])


def test_corrupt_mid_file_skip_mode_records_the_damage(tmp_path, bclip, reference):
    bad = corrupt_mid_file(bclip, tmp_path / "corrupt.mp4")
    stats = DecodeStats()
    got = list(read_frames(bad, gray=True, on_error="skip", stats=stats))
    indices = [g.index for g in got]
    assert stats.errors and all("decoding error" in e for e in stats.errors)
    assert indices == sorted(set(indices)) and indices[0] == 0 and indices[-1] == N - 1
    assert stats.decoded == len(got) < N and stats.gaps == N - len(got) and stats.missing(N) == stats.gaps
    # Frames keep their true index after the damage (a frame counter would shift them all).
    assert_same(got[-12:], reference[-12:])


# ---- VideoWriter -------------------------------------------------------------------------------------

def test_writer_round_trip_keeps_count_rate_and_pixels(tmp_path):
    frames = list(moving_square_frames(25, 161, 121))  # odd size: padded to even for yuv420p
    out = tmp_path / "out" / "overlay.mp4"
    with VideoWriter(out, Fraction(30000, 1001), 161, 121) as writer:
        for img in frames:
            writer.write(img)
            assert not out.exists()  # nothing visible until closed
        assert writer.size == (162, 122)
    assert writer.codec == ("libx264" if h264_available() else "mpeg4")
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.mp4"]  # no temporary left
    info = probe(out)
    assert (info.frames, info.width, info.height) == (25, 162, 122)
    assert info.rate == Fraction(30000, 1001)
    assert info.codec == ("h264" if h264_available() else "mpeg4")
    back = list(read_frames(out))
    assert [read_stamp(f.image) for f in back] == list(range(25))
    assert np.abs(back[7].image[:121, :161].astype(int) - frames[7]).mean() < 6


def test_writer_mpeg4_and_float_fps(tmp_path):
    out = tmp_path / "m.mp4"
    with VideoWriter(out, 25.0, 64, 48, codec="mpeg4") as writer:
        for img in moving_square_frames(10, 64, 48):
            writer.write(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))  # gray frames are accepted too
    info = probe(out)
    assert (info.codec, info.frames, info.rate, info.width) == ("mpeg4", 10, Fraction(25), 64)


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, 30, 64, 48) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="expected a 48x64"):
        with VideoWriter(tmp_path / "size.mp4", 30, 64, 48) as writer:
            writer.write(np.zeros((48, 65, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4", 30, 64, 48):
            pass
    assert list(tmp_path.iterdir()) == []


# ---- inputs --------------------------------------------------------------------------------------

def test_find_media(tmp_path):
    files = ["a.mp4", "b.MOV", "sub/c.Jpg", "sub/deep/d.webm", "sub/notes.txt", "sub/.hidden.mp4",
             ".cache/e.mp4", "other/f.mkv", "other/g.png", "weird.dat", "odd [1].dat"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    root = tmp_path.resolve()
    found = find_media([str(tmp_path / "sub"), str(tmp_path / "a.mp4"), str(tmp_path / "*.mov"),
                        str(tmp_path / "*.MOV"), str(tmp_path / "weird.dat"), str(tmp_path / "sub" / "c.Jpg")])
    assert found == sorted([root / "a.mp4", root / "b.MOV", root / "sub/c.Jpg", root / "sub/deep/d.webm",
                            root / "weird.dat"], key=str)
    everything = find_media([str(tmp_path)])
    assert [p.relative_to(root).as_posix() for p in everything] == [
        "a.mp4", "b.MOV", "other/f.mkv", "other/g.png", "sub/c.Jpg", "sub/deep/d.webm"]
    assert find_media([str(tmp_path / "**" / "*.png")]) == [root / "other/g.png"]
    assert find_media([str(tmp_path / "empty"), str(tmp_path / "*.avi")]) == []
    assert find_media([str(tmp_path / "odd [1].dat")]) == [root / "odd [1].dat"]  # a name, not a pattern
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        find_media([str(tmp_path / "a.mp4"), str(tmp_path / "nope.mp4")])
    assert {".mp4", ".mov", ".ts"} <= set(VIDEO_EXTENSIONS) and {".jpg", ".png", ".tiff"} <= set(IMAGE_EXTENSIONS)


def test_inputs_named_by_uri(tmp_path, bclip):
    """file:// goes through pyarrow's filesystems, the route s3:// and gs:// inputs take."""
    for name in ["v/a.mp4", "v/sub/b.MOV", "v/sub/notes.txt", "v/.hidden/c.mp4", "v/x.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    root = tmp_path.resolve().as_uri()
    assert find_media([f"{root}/v"]) == [f"{root}/v/a.mp4", f"{root}/v/sub/b.MOV", f"{root}/v/x.png"]
    assert find_media([f"{root}/v/**/*.MOV", f"{root}/v/a.mp4"]) == [f"{root}/v/a.mp4", f"{root}/v/sub/b.MOV"]
    assert find_media([f"{root}/v/*.avi"]) == []
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        find_media([f"{root}/v/nope.mp4"])
    with pytest.raises(ValueError, match="cannot open"):
        find_media(["nosuchscheme://bucket/videos"])

    uri = bclip.resolve().as_uri()
    local, remote = probe(bclip), probe(uri)
    assert (remote.frames, remote.fps, remote.width, remote.height) == (local.frames, local.fps, local.width, local.height)
    assert remote.path == uri
    want = [(f.index, f.image) for f in read_frames(bclip, 30, 50, gray=True)]
    got = [(f.index, f.image) for f in read_frames(uri, 30, 50, gray=True)]  # a seek, through pyarrow
    assert [i for i, _ in got] == list(range(30, 50)) and all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))

    img = np.full((40, 60, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "still.png"), img)
    [frame] = read_frames((tmp_path / "still.png").resolve().as_uri())
    assert np.array_equal(frame.image, img)
    for name, reason in [("v/nope.mp4", "file not found"), ("v", "is a directory"), ("empty.mp4", "empty file")]:
        (tmp_path / "empty.mp4").write_bytes(b"")
        with pytest.raises(VideoError, match=reason):
            probe(f"{root}/{name}")
    assert video_id(uri) == video_id(uri) != video_id(bclip) and video_id(uri).startswith("bframes-")


def test_video_id(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    a, b = tmp_path / "My clip (1)é.mp4", tmp_path / "x" / "My clip (1)é.mp4"
    vid = video_id(a)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+-[0-9a-f]{8}", vid) and vid.startswith("My_clip_1")
    assert video_id(a) == vid and video_id(b) != vid
    monkeypatch.chdir(tmp_path)
    assert video_id("My clip (1)é.mp4") == vid and video_id(Path("x/../My clip (1)é.mp4")) == vid


# ---- real data -----------------------------------------------------------------------------------

@pytest.mark.data
def test_real_bench_clip_range_matches_sequential(real_data):
    path = real_data / "bench" / "talk_640x480_3000.mp4"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height, info.codec) == (3000, 30.0, 640, 480, "h264")
    stats = DecodeStats()
    got = list(read_frames(path, 1000, 1100, gray=True, stats=stats))
    assert stats.seeks >= 1 and not stats.sequential
    expected = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, f in enumerate(c.decode(s)):
            if i >= 1000:
                expected.append((i, f.to_ndarray(format="gray")))
            if i == 1099:
                break
    assert_same(got, expected)
    for clip in sorted((real_data / "videos").glob("*.mp4")):
        v = probe(clip)
        assert v.frames > 0 and v.fps > 0 and v.frames_exact and v.codec == "h264"
