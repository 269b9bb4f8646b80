"""jobs.export: OpenFace / wide CSV / JSON lines from part files made here with fkp_core.tables; URIs, exit 2, streaming."""

from __future__ import annotations

import contextlib
import gc
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fkp_core import export as ex
from fkp_core.pose import rotation_matrix
from fkp_core.store import Output, open_output
from fkp_core.tables import FaceColumns, faces_table, videos_table
from jobs import export as export_job


def make_columns(n: int, seed: int = 0, nan_pose_at: int | None = None) -> FaceColumns:
    rng = np.random.default_rng(seed)
    frames = np.arange(n, dtype=np.int64) // 2  # two faces per frame
    kp = rng.uniform(0, 640, size=(n, 68, 2)).astype(np.float32)
    pose = rng.uniform(-40, 40, size=(n, 3)).astype(np.float32)
    if nan_pose_at is not None:
        pose[nan_pose_at] = np.nan
    return FaceColumns(
        frame_index=frames, timestamp_s=frames / 25.0, face_index=(np.arange(n) % 2).astype(np.int32),
        track_id=(np.arange(n) % 2 + 3).astype(np.int64), boxes=rng.integers(0, 500, size=(n, 4)).astype(np.int32),
        detected=rng.random(n) > 0.5, confidence=rng.uniform(0, 1, n).astype(np.float32), keypoints=kp,
        keypoints_raw=kp + 0.5, pose=pose,
    )


def make_output(root, videos: dict[str, FaceColumns], row_group_size: int | None = None):
    """An fkp output folder: part files, status records and _videos.parquet, as jobs.annotate writes them."""
    out = open_output(str(root))
    records = []
    for vid, cols in videos.items():
        table = faces_table(vid, f"/videos/{vid}.mp4", cols)
        if row_group_size:
            out.makedirs(out.root)
            pq.write_table(table, out.part_path(vid), row_group_size=row_group_size)
        else:
            out.write_table(out.part_path(vid), table)
        rec = {"video_id": vid, "path": f"/videos/{vid}.mp4", "status": "ok", "faces": len(cols), "output": out.part_path(vid)}
        out.write_json(out.status_path(vid), rec)
        records.append(rec)
    out.write_table(out.path("_videos.parquet"), videos_table(records))
    return root


@pytest.fixture
def output(tmp_path):
    return make_output(tmp_path / "run", {"clip-0000aaaa": make_columns(40, nan_pose_at=5), "empty-0000bbbb": FaceColumns.empty()})


def run(*argv) -> int:
    return export_job.main([str(a) for a in argv] + ["-q"])


def openface_rotation_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """OpenFace's Euler2RotationMatrix: R = Rx @ Ry @ Rz (right-handed rotations about camera axes)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mx @ my @ mz


def test_openface_layout_and_values(output):
    assert run(output, "--format", "openface") == 0
    dest = output / "_export" / "openface"
    text = (dest / "clip-0000aaaa.csv").read_text()
    header = text.splitlines()[0]
    assert header.startswith("frame, face_id, timestamp, confidence, success, pose_Rx, pose_Ry, pose_Rz, x_0, x_1, ")
    assert header.split(", ")[8:] == [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
    assert text.splitlines()[1].count(", ") == 8 + 136 - 1  # OpenFace separates values with a comma and a space too
    df = pd.read_csv(dest / "clip-0000aaaa.csv", skipinitialspace=True)
    src = pd.read_parquet(output / "part-clip-0000aaaa.parquet")
    assert len(df) == len(src) == 40
    assert (df.frame == src.frame_index + 1).all()  # OpenFace counts frames from 1
    assert (df.face_id == src.track_id).all()
    # success: a fit to use, as OpenFace's flag means: all points and the default --min-confidence
    from fkp_core.constants import MIN_FACE_CONFIDENCE

    low = src.confidence < MIN_FACE_CONFIDENCE
    assert low.any() and (~low).any()
    assert (df.success == np.where(low, 0, 1)).all()
    np.testing.assert_allclose(df.timestamp, src.timestamp_s, atol=5e-4)
    np.testing.assert_allclose(df.confidence, src.confidence, atol=5e-3)
    kp = np.stack(src.keypoints.to_numpy()).reshape(-1, 68, 2)
    np.testing.assert_allclose(df[[f"x_{i}" for i in range(68)]].to_numpy(), kp[:, :, 0], atol=0.05 + 1e-4)
    np.testing.assert_allclose(df[[f"y_{i}" for i in range(68)]].to_numpy(), kp[:, :, 1], atol=0.05 + 1e-4)
    # pose: OpenFace's angles give back fkp's rotation (to the 3 decimals written)
    for i in range(len(df)):
        if i == 5:
            assert df.loc[i, ["pose_Rx", "pose_Ry", "pose_Rz"]].isna().all()  # no fit: NaN, read as a number
            continue
        r_of = openface_rotation_matrix(*df.loc[i, ["pose_Rx", "pose_Ry", "pose_Rz"]].astype(float))
        r_fkp = rotation_matrix(float(src.yaw[i]), float(src.pitch[i]), float(src.roll[i]))
        np.testing.assert_allclose(r_of, r_fkp, atol=3e-3)
    empty = (dest / "empty-0000bbbb.csv").read_text()
    assert empty.splitlines() == [header]  # a video without faces: the header alone


def test_openface_rotation_signs_match_openface():
    """OpenFace: head up -> pose_Rx < 0; turning to the subject's right -> pose_Ry > 0; radians."""
    rot = ex.openface_rotation(np.array([0.0, -20.0, 0.0]), np.array([10.0, 0.0, 0.0]), np.array([0.0, 0.0, 15.0]))
    np.testing.assert_allclose(rot[0], [-math.radians(10), 0, 0], atol=1e-12)  # fkp pitch > 0: looks up
    np.testing.assert_allclose(rot[1], [0, math.radians(20), 0], atol=1e-12)  # fkp yaw < 0: turns to their right
    np.testing.assert_allclose(rot[2], [0, 0, -math.radians(15)], atol=1e-12)  # fkp roll > 0: counter-clockwise


def test_plain_csv_and_jsonl_carry_every_value(output):
    src = pd.read_parquet(output / "part-clip-0000aaaa.parquet")
    kp = np.stack(src.keypoints.to_numpy()).reshape(-1, 68, 2)
    assert run(output, "--format", "csv", "--dest", output.parent / "csv") == 0
    df = pd.read_csv(output.parent / "csv" / "clip-0000aaaa.csv")
    scalars = ["video_id", "video_path", "frame_index", "timestamp_s", "face_index", "track_id", "box_x", "box_y", "box_w",
               "box_h", "detected", "confidence"]
    assert list(df.columns) == (scalars + [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)] + ["yaw", "pitch", "roll"]
                                + [f"keypoint_scores_{i}" for i in range(68)])
    for c in scalars:
        if c in ("confidence",):
            np.testing.assert_array_equal(df[c].to_numpy(np.float32), src[c].to_numpy())  # float32 written losslessly
        else:
            assert (df[c] == src[c]).all(), c
    np.testing.assert_array_equal(df[[f"x_{i}" for i in range(68)]].to_numpy(np.float32), kp[:, :, 0])
    assert np.isnan(df.yaw[5]) and df.yaw[4] == pytest.approx(src.yaw[4], abs=1e-5)
    assert list(pd.read_csv(output.parent / "csv" / "empty-0000bbbb.csv").columns) == list(df.columns)

    assert run(output, "--format", "jsonl", "--raw", "--dest", output.parent / "jl") == 0
    lines = (output.parent / "jl" / "clip-0000aaaa.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: NaN would not parse as a number here
    assert len(rows) == 40 and rows[5]["yaw"] is None
    assert np.allclose(rows[3]["keypoints"], kp[3], atol=1e-4) and len(rows[3]["keypoints"]) == 68
    assert np.allclose(rows[3]["keypoints_raw"], kp[3] + 0.5, atol=1e-4)
    assert rows[3]["frame_index"] == 1 and rows[3]["track_id"] == 4 and rows[3]["video_id"] == "clip-0000aaaa"
    assert (output.parent / "jl" / "empty-0000bbbb.jsonl").read_text() == ""


def test_uri_paths_and_video_selection(output, tmp_path):
    dest = tmp_path / "by-uri"
    assert run(output.as_uri(), "--format", "openface", "--dest", dest.as_uri(), "--videos", "clip-*") == 0
    assert sorted(p.name for p in dest.iterdir()) == ["clip-0000aaaa.csv"]  # nothing half-written left beside it
    local = tmp_path / "local"
    assert run(output, "--format", "openface", "--dest", local) == 0
    assert (dest / "clip-0000aaaa.csv").read_bytes() == (local / "clip-0000aaaa.csv").read_bytes()


@pytest.mark.parametrize("case", ["missing", "empty", "other", "bad-part", "batch", "no-match"])
def test_not_an_fkp_output_exits_2_with_one_line(tmp_path, output, capsys, case):
    target, extra = tmp_path / case, []
    if case == "empty":
        target.mkdir()
    elif case == "other":
        target.mkdir()
        (target / "part-x.parquet").write_bytes(b"not parquet")
        pq.write_table(pa.table({"a": [1]}), target / "data.parquet")
    elif case == "bad-part":
        target = output
        pq.write_table(pa.table({"a": [1]}), output / "part-zzz.parquet")
    elif case == "batch":
        target, extra = output, ["--batch-rows", "0"]
        with pytest.raises(SystemExit) as exc:  # checked by the parser: one line, exit 2
            export_job.main([str(target), "--format", "csv", *extra])
        assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
        return
    elif case == "no-match":
        target, extra = output, ["--videos", "nothing*"]
    capsys.readouterr()
    assert run(target, "--format", "csv", *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jobs.export: error:"), err
    if case == "empty":
        with pytest.raises(SystemExit) as exc:  # argparse's own errors: one line too, exit 2
            export_job.main([str(target), "--format", "xml"])
        assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def _export_peak(out, part, fmt, dest, batch_rows):
    """(batch sizes read, writes made, peak Arrow memory seen while exporting, above what was in use before)."""
    gc.collect()
    base = pa.total_allocated_bytes()
    sizes, writes, peak = [], [], [base]

    def seen(_=None):
        peak[0] = max(peak[0], pa.total_allocated_bytes())

    real_open = Output.open_atomic

    class Recorder:
        """The stream export writes to, seen write by write (Arrow's CSV writer's writes included)."""

        def __init__(self, stream):
            self.stream, self.closed = stream, False

        def write(self, data):
            writes.append(len(data))
            seen()
            return self.stream.write(data)

        def flush(self):
            self.stream.flush()

        def close(self):
            self.closed = True

    @contextlib.contextmanager
    def spy(self, path):
        with real_open(self, path) as stream, pa.PythonFile(Recorder(stream), mode="w") as f:
            yield f

    Output.open_atomic = spy
    try:
        result = ex.export_part(out, part, fmt, dest, batch_rows=batch_rows, on_batch=lambda b: (sizes.append(len(b)), seen()))
    finally:
        Output.open_atomic = real_open
    assert result.rows == sum(sizes) and result.batches == len(sizes)
    return sizes, writes, peak[0] - base


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_it_streams_batch_by_batch(tmp_path, fmt):
    """Part files of 4 and 16 row groups are read, formatted and written 500 rows at a time, and the Arrow memory
    in use does not grow with the file (a reader that loaded the file would need 4x as much for the longer one)."""
    peaks, wholes = [], []
    for n in (6_000, 24_000):
        root = make_output(tmp_path / f"run{n}", {"long-0000cccc": make_columns(n, seed=3)}, row_group_size=1_500)
        out = open_output(str(root))
        part = ex.list_parts(out)[0]
        assert pq.ParquetFile(part.path).num_row_groups == n // 1_500
        wholes.append(pq.read_table(part.path).nbytes)  # 7 and 29 MB in memory
        sizes, writes, peak = _export_peak(out, part, fmt, open_output(str(tmp_path / f"{fmt}{n}")), 500)
        assert sizes == [500] * (n // 500)
        assert len(writes) >= n // 500  # at least a write per batch read: nothing held back to the end
        peaks.append(peak)
    assert peaks[1] < 1.2 * peaks[0] + 1e6, (peaks, wholes)  # measured: equal to within 0.1 MB
    assert peaks[1] < 0.5 * wholes[1], (peaks, wholes)  # measured: 7-9 MB of 29


def object_store_like(root) -> Output:
    """An output folder whose filesystem is not the local one, so it takes the object-store route: written in
    place under the final name and published when the stream closes, as S3 or GCS do."""
    import pyarrow.fs as pafs

    root.mkdir(parents=True, exist_ok=True)
    return Output(pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), "dest", "subtree://dest")


@pytest.mark.parametrize("where", ["local", "object store"])
def test_a_failed_export_leaves_no_file(tmp_path, where):
    root = make_output(tmp_path / "run", {"v-0000aaaa": make_columns(100)})
    out = open_output(str(root))
    dest = open_output(str(tmp_path / "dest")) if where == "local" else object_store_like(tmp_path)
    seen = []

    def fail_on_second(batch):
        seen.append(len(batch))
        if len(seen) == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ex.export_part(out, ex.list_parts(out)[0], "openface", dest, batch_rows=30, on_batch=fail_on_second)
    assert list((tmp_path / "dest").iterdir()) == []  # neither half a file nor its temporary
    if where == "object store":  # the same export, not failing, does publish there
        ex.export_part(out, ex.list_parts(out)[0], "openface", dest, batch_rows=30)
        assert [p.name for p in (tmp_path / "dest").iterdir()] == ["v-0000aaaa.csv"]


def test_every_flag_is_explained():
    parser = export_job.build_parser()
    assert all((a.help or "").strip() for a in parser._actions)
    assert "(default: None)" not in parser.format_help()
