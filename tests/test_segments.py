"""fkp_core.segments and fkp_core.store: a video annotated with the library alone, the output folder's writes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from conftest import PROJECT_ROOT
from fkp_core.records import Segment, SegmentResult, VideoPlan, VideoProbe, VideoRecord
from fkp_core.segments import AnnotateSettings, annotate_video, plan_segments, video_status
from fkp_core.store import open_output
from fkp_core.tables import FACE_SCHEMA, record_from_json, record_to_json

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"


def test_the_library_gives_the_rows_of_the_job(tmp_path, ray_session):
    """README "Library use": a few lines, no Ray, and the same rows as `python -m jobs.annotate` with the same segments."""
    import pandas as pd

    from jobs import annotate

    settings = AnnotateSettings.for_model(None, segment_frames=160)
    rows, record = annotate_video(str(SAMPLE), settings=settings)
    assert record.status == "ok" and record.faces == rows.num_rows == 320 and record.segments == 2
    assert annotate.main([str(SAMPLE), "--out", str(tmp_path / "out"), "--segment-frames", "160", "-q"]) == 0
    job = pd.read_parquet(tmp_path / "out")
    mine = rows.to_pandas()
    assert list(mine.columns) == list(job.columns)
    for column in mine.columns:
        assert all(np.array_equal(a, b) for a, b in zip(mine[column], job[column])), column


def test_plans_and_status_policy():
    assert plan_segments(10, 4) == [Segment(0, 4), Segment(4, 8), Segment(8, None)]
    plan = VideoPlan("v.mp4", "v-0", VideoProbe(frames=10, fps=25.0, width=8, height=8), segments=plan_segments(10, 5))
    whole = [SegmentResult(0, 5, frames=5, decoded=5), SegmentResult(5, None, frames=5, decoded=5)]
    assert video_status(plan, whole) == ("ok", [])
    assert video_status(plan, whole[:1])[0] == "partial"  # fewer frames than an exact count promised
    assert video_status(plan, [replace(whole[0], error="bad packet"), whole[1]]) == ("partial", ["bad packet"])
    assert video_status(plan, [SegmentResult(0, 5), SegmentResult(5, None)])[0] == "failed"


def test_records_round_trip_and_old_keys_are_ignored():
    record = VideoRecord("v-0", "v.mp4", "ok", faces=3, stage_seconds={"cnn": 1.0}, source={"size": 1, "mtime_ns": 2})
    assert record_from_json(record_to_json(record)) == record
    assert record_from_json({**record_to_json(record), "from_a_later_version": 1}) == record


def test_every_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    out = open_output(str(tmp_path / "out"))
    out.write_json(out.path("a.json"), {"x": 1})
    with pytest.raises(RuntimeError):
        with out.table_writer(out.path("part.parquet"), FACE_SCHEMA) as writer:
            writer.write_table(pa.Table.from_pylist([], schema=FACE_SCHEMA))
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json"]  # no half file, no temp file
    assert out.read_json(out.path("a.json")) == {"x": 1}


def test_render_accepts_the_uris_out_accepts(tmp_path, ray_session):
    """--render, like --out, takes a filesystem URI (file:// takes the route s3:// and gs:// take)."""
    from fkp_core.video import probe, video_id
    from jobs import annotate

    src = tmp_path / "clip.mp4"
    src.write_bytes(SAMPLE.read_bytes())
    render = tmp_path / "rendered"
    argv = [str(src), "--out", str(tmp_path / "out"), "--render", render.as_uri(), "--segment-frames", "320", "-q"]
    assert annotate.main(argv) == 0
    written = render / f"{video_id(src)}.mp4"
    assert probe(written).frames == 320
    assert not [p for p in render.iterdir() if p.name.startswith(".")]  # no temporary file left
    record = open_output(str(tmp_path / "out")).read_record(video_id(src))
    assert record.render == f"{render.as_uri()}/{written.name}"
    assert annotate.main(argv) == 0  # finished and rendered: nothing to do
