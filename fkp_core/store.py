"""The output folder, its one owner: layout, the one all-or-nothing write, and the queries a resumed run asks.

Layout (a local path or any pyarrow filesystem URI such as ``s3://bucket/run``)::

    OUT/part-<video_id>.parquet                 faces of one video, ordered by frame then face
    OUT/_videos.parquet                         one row per input: status, counts, timings
    OUT/_status/<video_id>.json                 per-video status records (the source of _videos.parquet)
    OUT/_segments/<video_id>/plan.json          the segments and settings the work in progress was made with
    OUT/_segments/<video_id>/<start>-<end>.parquet   a finished segment, removed when the video is finished

pyarrow (and so pandas) ignores names starting with ``_`` when it reads a folder as a dataset,
so ``pd.read_parquet(OUT)`` returns the faces of all videos; globbing ``OUT/part-*.parquet``
does the same in DuckDB and polars. Every file is written under a unique temporary name and
renamed (or, on object stores, uploaded in one piece), so a reader never sees half a file and a
retried writer never meets another's temporary file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fkp_core.records import Segment, SegmentResult, VideoPlan, VideoRecord

log = logging.getLogger("fkp.store")

PARQUET_COMPRESSION = "zstd"


def segment_name(start: int, end: int | None) -> str:
    return f"{start:010d}-{'end' if end is None else f'{end:010d}'}.parquet"


def _temp_name(path: str) -> str:
    """A hidden name beside ``path``, unique per writer (two writers of one file never share one)."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_local_path(target: str | os.PathLike) -> Iterator[str]:
    """A temporary path for a writer that needs a local file name (an encoder); renamed to ``target`` on success.

    On failure the temporary file is removed: nothing half-written is ever left under either name.
    """
    target = os.fspath(target)
    tmp = _temp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)  # rename(2): atomic on one filesystem
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@dataclass(frozen=True)
class Output:
    """An output folder on some filesystem (local disk, S3, GCS...)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    # ---- layout ----

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def part_path(self, video_id: str) -> str:
        return self.path(f"part-{video_id}.parquet")

    def status_path(self, video_id: str) -> str:
        return self.path("_status", f"{video_id}.json")

    def segment_dir(self, video_id: str) -> str:
        return self.path("_segments", video_id)

    def segment_path(self, video_id: str, segment: Segment) -> str:
        return self.path("_segments", video_id, segment_name(segment.start, segment.end))

    def plan_path(self, video_id: str) -> str:
        return self.path("_segments", video_id, "plan.json")

    def videos_path(self) -> str:
        return self.path("_videos.parquet")

    # ---- files ----

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def remove_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def remove_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    @contextlib.contextmanager
    def open_atomic(self, path: str) -> Iterator[pa.NativeFile]:
        """THE all-or-nothing write: a stream under a temporary name, renamed on success (locally); on object
        stores one upload, published when the stream closes. Every file of the folder is written through it.

        A writer that fails leaves nothing: locally its temporary file is removed; an object store's stream
        publishes whatever it holds when it closes (pyarrow offers no abort), so that object is deleted again."""
        self.makedirs(posixpath.dirname(path))
        if not self.is_local:
            with self.fs.open_output_stream(path) as f:  # object stores publish on completion
                try:
                    yield f
                except BaseException:
                    f.close()
                    self.remove_file(path)
                    raise
            return
        tmp = _temp_name(path)
        try:
            with self.fs.open_output_stream(tmp) as f:
                yield f
            self.fs.move(tmp, path)  # rename(2): atomic on one filesystem
        except BaseException:
            if self.exists(tmp):
                self.fs.delete_file(tmp)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.open_atomic(path) as f:
            f.write(data)

    def upload(self, local_path: str | os.PathLike, path: str, chunk: int = 1 << 22) -> None:
        """A local file (an encoder's output) copied in, through the same all-or-nothing write."""
        with open(local_path, "rb") as src, self.open_atomic(path) as dst:
            while block := src.read(chunk):
                dst.write(block)

    def write_table(self, path: str, table: pa.Table) -> None:
        with self.open_atomic(path) as f:
            pq.write_table(table, f, compression=PARQUET_COMPRESSION)

    @contextlib.contextmanager
    def table_writer(self, path: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A Parquet file written piece by piece (``write_table`` per piece), published whole at the end."""
        with self.open_atomic(path) as f, pq.ParquetWriter(f, schema, compression=PARQUET_COMPRESSION) as writer:
            yield writer

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(path) as f:
            return pq.read_table(f, columns=columns)

    def read_schema(self, path: str) -> pa.Schema:
        with self.fs.open_input_file(path) as f:
            return pq.read_schema(f)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    # ---- typed records ----

    def write_record(self, record: VideoRecord) -> None:
        from fkp_core.tables import record_to_json

        self.write_json(self.status_path(record.video_id), record_to_json(record))

    def read_record(self, video_id: str) -> VideoRecord | None:
        from fkp_core.tables import record_from_json

        path = self.status_path(video_id)
        return record_from_json(self.read_json(path)) if self.exists(path) else None

    def records(self) -> list[VideoRecord]:
        """Every status record in the folder (earlier runs included), by input path."""
        from fkp_core.tables import record_from_json

        found = [record_from_json(self.read_json(f)) for f in self.listdir(self.path("_status")) if f.endswith(".json")]
        return sorted(found, key=lambda r: r.path)

    def write_videos_table(self) -> None:
        """OUT/_videos.parquet from every status record in OUT."""
        from fkp_core.tables import videos_table

        self.write_table(self.videos_path(), videos_table(self.records()))

    # ---- resume queries ----

    def finished(self, plan: VideoPlan) -> VideoRecord | None:
        """The record of an input finished here with its rows still there (None: to do). Sets ``plan.changed``
        when another file has taken its path since (its rows are not this file's)."""
        record = self.read_record(plan.video_id)
        if record is None or not record.done or not self.exists(record.output):
            return None
        if record.source and plan.source and record.source != plan.source:
            plan.changed = True
            return None
        return record

    def forget(self, video_id: str) -> None:
        """Remove whatever the folder holds for one input (before it is annotated again)."""
        self.remove_file(self.status_path(video_id))
        self.remove_file(self.part_path(video_id))
        self.remove_dir(self.segment_dir(video_id))

    def keep_plan(self, video_id: str, wanted: dict) -> bool:
        """Record the plan of a video's work in progress; segments written under another plan are dropped.
        -> False when earlier segments were dropped."""
        path = self.plan_path(video_id)
        kept = True
        if self.exists(path) and self.read_json(path) != wanted:
            self.remove_dir(self.segment_dir(video_id))
            kept = False
        if not self.exists(path):
            self.write_json(path, wanted)
        return kept

    def segment_done(self, video_id: str, segment: Segment) -> SegmentResult | None:
        """The result of a segment an earlier run wrote (None: not there, or unreadable and so to be redone)."""
        from fkp_core.tables import segment_result_from_schema

        path = self.segment_path(video_id, segment)
        if not self.exists(path):
            return None
        try:
            return segment_result_from_schema(self.read_table(path).schema)
        except Exception as exc:  # noqa: BLE001 - a damaged file from an earlier run is simply redone
            log.warning("%s: unreadable (%s); annotating the segment again", path, exc)
            return None

    def segment_result(self, video_id: str, segment: Segment) -> SegmentResult:
        """A written segment's result, from its file's metadata alone (its rows are not read)."""
        from fkp_core.tables import segment_result_from_schema

        return segment_result_from_schema(self.read_schema(self.segment_path(video_id, segment)))

    def write_segment(self, video_id: str, path: str, result: SegmentResult, cols) -> None:
        from fkp_core.tables import segment_table

        self.write_table(self.segment_path(video_id, Segment(result.start, result.end)), segment_table(video_id, path, result, cols))

    def read_segment(self, video_id: str, segment: Segment):
        """-> (SegmentResult, FaceColumns) of a written segment."""
        from fkp_core.tables import columns_from_table, segment_result_from_schema

        table = self.read_table(self.segment_path(video_id, segment))
        return segment_result_from_schema(table.schema), columns_from_table(table)


def file_exists(path_or_uri: str) -> bool:
    """Whether a file named by a local path or a filesystem URI is there (a rendered video, say)."""
    if "://" not in path_or_uri:
        return os.path.exists(path_or_uri)
    try:
        fs, where = pafs.FileSystem.from_uri(path_or_uri)
        return fs.get_file_info(where).type == pafs.FileType.File
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        return False


def open_output(uri: str) -> Output:
    """Resolve a local path or filesystem URI; raises ValueError for a URI pyarrow cannot open."""
    if "://" in uri:
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ValueError(f"{uri}: cannot open this output location ({exc})") from exc
        return Output(fs, root.rstrip("/"), uri)
    root = os.path.abspath(uri)
    return Output(pafs.LocalFileSystem(), root.replace(os.sep, "/"), root)
