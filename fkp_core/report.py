"""The run report: one self-contained static HTML page (inline CSS and JS, thumbnails as data: URIs).

A per-video table (status, error, frames, faces, tracks, seconds; failed and partial first; sortable
by clicking a header, or by ``#sort=KEY`` / ``#sort=KEY:desc`` in the page's URL), totals, and a strip
of thumbnails per video: the face crop of a few frames of each track, decoded again from the input
video, with its keypoints drawn. Everything is bounded: ``ReportConfig`` caps the thumbnails per
track, the tracks per video and the videos with strips, and part files are read in record batches
of a few columns (the thumbnails of a two-hour video cost what those of a short clip cost, plus a
pass over two integer columns).

A script in the page writes what a browser made of it into ``<pre id="fkp-check">`` (JSON: rows
of the table in order, images and how many decoded), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial

import numpy as np

from fkp_core.store import Output, open_output

log = logging.getLogger("fkp.report")

CACHE_DIR = "_report"  # OUT/_report/<video_id>.json: each video's thumbnails, reused while the video is unchanged
REPORT_NAME = "_report.html"  # "_": readers of the folder as a Parquet dataset skip it
STATUS_RANK = {"failed": 0, "partial": 1, "ok": 2}
_BATCH_ROWS = 65536


@dataclass(frozen=True)
class ReportConfig:
    per_track: int = 3  # thumbnails per track, spread from its first frame to its last
    max_tracks: int = 6  # tracks per video with thumbnails (the longest ones)
    max_videos: int = 100  # videos with a thumbnail strip (failed and partial first, in table order)
    size: int = 112  # thumbnail side in pixels
    quality: int = 80  # JPEG quality

    def __post_init__(self) -> None:
        if min(self.per_track, self.max_tracks, self.max_videos) < 0 or self.size < 16 or not 1 <= self.quality <= 100:
            raise ValueError(f"bad report settings: {self}")


@dataclass(frozen=True)
class VideoRow:
    """One line of the per-video table (a status record of OUT/_status)."""

    video_id: str
    path: str
    status: str
    error: str | None = None
    frames_expected: int | None = None
    frames_decoded: int | None = None
    frames_with_faces: int | None = None
    faces: int | None = None
    tracks: int | None = None
    seconds: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    output: str | None = None
    finished_at: str | None = None

    @staticmethod
    def from_record(record: dict) -> VideoRow:
        return VideoRow(**{k: record.get(k) for k in VideoRow.__dataclass_fields__})

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) or self.path


@dataclass(frozen=True)
class Thumbnail:
    track_id: int
    frame_index: int
    timestamp_s: float
    jpeg: bytes
    size: int  # pixels (square)


@dataclass(frozen=True)
class VideoThumbs:
    video_id: str
    thumbnails: tuple[Thumbnail, ...] = ()
    tracks: int = 0  # tracks in the video (thumbnails show at most ReportConfig.max_tracks of them)
    note: str | None = None  # why some or all thumbnails are missing


@dataclass(frozen=True)
class RunReport:
    title: str
    generated_at: str
    videos: tuple[VideoRow, ...]
    thumbs: dict[str, VideoThumbs] = field(default_factory=dict)


def table_order(rows: Iterable[VideoRow]) -> list[VideoRow]:
    """Failed first, then partial, then ok; by path within each."""
    return sorted(rows, key=lambda r: (STATUS_RANK.get(r.status, -1), r.path))


# ------------------------------------------------------------------------------------------
# thumbnails
# ------------------------------------------------------------------------------------------


def pick_frames(frame_index: np.ndarray, track_id: np.ndarray, per_track: int, max_tracks: int) -> dict[int, list[int]]:
    """{track: frames}: the ``max_tracks`` tracks with the most rows, ``per_track`` frames each spread over the track."""
    if len(frame_index) == 0 or per_track == 0 or max_tracks == 0:
        return {}
    tracks, counts = np.unique(track_id, return_counts=True)
    chosen = tracks[np.lexsort((tracks, -counts))][:max_tracks]
    picked = {}
    for t in chosen:
        frames = np.unique(frame_index[track_id == t])
        at = np.unique(np.round(np.linspace(0, len(frames) - 1, min(per_track, len(frames)))).astype(int))
        picked[int(t)] = [int(frames[i]) for i in at]
    return picked


def _read_columns(out: Output, path: str, columns: list[str]) -> Iterable:
    from fkp_core.export import iter_batches

    return iter_batches(out, path, _BATCH_ROWS, columns=columns)


def face_thumbnail(image: np.ndarray, keypoints: np.ndarray, size: int, quality: int) -> bytes | None:
    """A square JPEG of the face around ``keypoints`` (68, 2) with them drawn; None when they are not finite."""
    import cv2

    from fkp_core.viz import draw_keypoints

    kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
    if not np.isfinite(kp).all():
        return None
    lo, hi = kp.min(0), kp.max(0)
    side = max(8.0, float((hi - lo).max()) * 1.5)
    cx, cy = (lo + hi) / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    img = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    pad = max(0, -x0, -y0, x0 + s - w, y0 + s - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(32, 32, 32))
    crop = img[y0 + pad : y0 + pad + s, x0 + pad : x0 + pad + s]
    scale = size / s
    thumb = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    thumb = draw_keypoints(thumb, (kp - [x0, y0]) * scale, radius=1, thickness=1)
    ok, buf = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return buf.tobytes() if ok else None


def video_thumbnails(out_uri: str, record: dict, config: ReportConfig) -> VideoThumbs:
    """Thumbnails of one finished video (its part file and its input); never raises: a problem becomes a note."""
    vid = record["video_id"]
    try:
        return _video_thumbnails(open_output(out_uri), record, config)
    except Exception as exc:  # noqa: BLE001 - a report with a note beats no report
        log.warning("%s: no thumbnails (%s: %s)", vid, type(exc).__name__, exc)
        return VideoThumbs(vid, note=f"no thumbnails: {type(exc).__name__}: {exc}")


def _video_thumbnails(out: Output, record: dict, config: ReportConfig) -> VideoThumbs:
    vid, part = record["video_id"], record.get("output") or out.part_path(record["video_id"])
    if not out.exists(part):
        return VideoThumbs(vid, note="no part file")
    frames, tracks = _frames_and_tracks(out, part)
    n_tracks = len(np.unique(tracks))
    picked = pick_frames(frames, tracks, config.per_track, config.max_tracks)
    if not picked:
        return VideoThumbs(vid, tracks=n_tracks, note=None if n_tracks else "no faces")
    faces = _picked_faces(out, part, {(t, f) for t, fs in picked.items() for f in fs})
    try:
        images, failed = _decode_again(record["path"], sorted({f for _, f in faces}))
    except Exception as exc:  # noqa: BLE001 - an input moved away or unreadable here: say so, keep going
        return VideoThumbs(vid, tracks=n_tracks, note=f"input not readable for thumbnails: {exc}")
    thumbs = []
    for t in sorted(picked):
        for f in picked[t]:
            if (t, f) not in faces or f not in images:
                continue
            kp, ts = faces[(t, f)]
            jpeg = face_thumbnail(images[f], kp, config.size, config.quality)
            if jpeg is not None:
                thumbs.append(Thumbnail(t, f, ts, jpeg, config.size))
    note = f"{failed} frame(s) could not be decoded again" if failed else None
    return VideoThumbs(vid, tuple(thumbs), n_tracks, note)


def _frames_and_tracks(out: Output, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row's frame index and track id (two integer columns: 16 bytes a row)."""
    fr, tr = [], []
    for b in _read_columns(out, part, ["frame_index", "track_id"]):
        fr.append(b.column(0).to_numpy())
        tr.append(b.column(1).to_numpy())
    frames = np.concatenate(fr) if fr else np.zeros(0, np.int64)
    tracks = np.concatenate(tr) if tr else np.zeros(0, np.int64)
    return frames, tracks


def _picked_faces(out: Output, part: str, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[np.ndarray, float]]:
    """(track, frame) -> (keypoints, timestamp) of the wanted faces, read a batch at a time."""
    from fkp_core.export import keypoint_array

    faces: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    for b in _read_columns(out, part, ["frame_index", "track_id", "timestamp_s", "keypoints"]):
        f_b, t_b = b.column(0).to_numpy(), b.column(1).to_numpy()
        hit = [i for i in range(len(b)) if (int(t_b[i]), int(f_b[i])) in wanted] if wanted else []
        if hit:
            kp = keypoint_array(b.take(hit))
            ts = b.column(2).to_numpy()
            for j, i in enumerate(hit):
                faces.setdefault((int(t_b[i]), int(f_b[i])), (kp[j], float(ts[i])))
    return faces


def _decode_again(path: str, frame_indices: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """(frame index -> BGR image, frames that did not decode) for the given frames of the input."""
    from fkp_core.video import read_frames

    images: dict[int, np.ndarray] = {}
    failed = 0
    for f in frame_indices:
        got = next(iter(read_frames(path, f, f + 1, gray=False, threads=1)), None)
        if got is None:
            failed += 1
            continue
        images[f] = got.image
    return images, failed


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------


def read_records(out: Output) -> list[dict]:
    """Every status record of OUT (the source of _videos.parquet), earlier runs included."""
    return [out.read_json(p) for p in out.listdir(out.path("_status")) if p.endswith(".json")]


def is_output(out: Output) -> bool:
    return out.exists(out.path("_videos.parquet")) or bool(out.listdir(out.path("_status")))


def _cache_key(record: dict, config: ReportConfig) -> str:
    """What a video's thumbnails depend on: its finished rows and the thumbnail settings."""
    return json.dumps([record.get("finished_at"), record.get("output"), record.get("faces"),
                       config.per_track, config.max_tracks, config.size, config.quality])


def _cache_path(out: Output, video_id: str) -> str:
    return out.path(CACHE_DIR, f"{video_id}.json")


def _load_cached(out: Output, record: dict, config: ReportConfig) -> VideoThumbs | None:
    path = _cache_path(out, record["video_id"])
    try:
        if not out.exists(path):
            return None
        data = out.read_json(path)
        if data.get("key") != _cache_key(record, config):
            return None
        thumbs = tuple(Thumbnail(t["track_id"], t["frame_index"], t["timestamp_s"], base64.b64decode(t["jpeg"]), t["size"])
                       for t in data["thumbnails"])
        return VideoThumbs(record["video_id"], thumbs, data["tracks"], data.get("note"))
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache entry is simply made again
        return None


def _store(out: Output, record: dict, config: ReportConfig, t: VideoThumbs) -> None:
    if t.note and (t.note.startswith("no thumbnails") or t.note.startswith("input not readable")):
        return  # may work next time (the input back online)
    out.write_json(_cache_path(out, t.video_id), {
        "key": _cache_key(record, config), "tracks": t.tracks, "note": t.note,
        "thumbnails": [{"track_id": x.track_id, "frame_index": x.frame_index, "timestamp_s": x.timestamp_s, "size": x.size,
                        "jpeg": base64.b64encode(x.jpeg).decode("ascii")} for x in t.thumbnails]})


def build_report(out: Output, config: ReportConfig | None = None,
                 map_fn: Callable[[Callable, list], Iterable] = map) -> RunReport:
    """The report of everything in OUT; ``map_fn(fn, records)`` makes the thumbnails (e.g. in parallel).

    Thumbnails are kept in OUT/_report/<video_id>.json and made again only when the video was finished
    again or the thumbnail settings changed, so a re-run's report decodes only the videos it finished.
    """
    config = config or ReportConfig()
    records = {r["video_id"]: r for r in read_records(out)}
    rows = table_order(VideoRow.from_record(r) for r in records.values())
    with_thumbs = [records[r.video_id] for r in rows if r.status != "failed" and r.output][: config.max_videos]
    thumbs: dict[str, VideoThumbs] = {}
    if with_thumbs and (config.per_track and config.max_tracks):
        todo = []
        for rec in with_thumbs:
            cached = _load_cached(out, rec, config)
            if cached is None:
                todo.append(rec)
            else:
                thumbs[rec["video_id"]] = cached
        for t in (map_fn(partial(video_thumbnails, out.uri, config=config), todo) if todo else []):
            thumbs[t.video_id] = t
            _store(out, records[t.video_id], config, t)
    return RunReport(title=out.uri, generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     videos=tuple(rows), thumbs=thumbs)


def write_report(out: Output, config: ReportConfig | None = None,
                 map_fn: Callable[[Callable, list], Iterable] = map) -> str:
    """Build the report and write OUT/_report.html (all-or-nothing); returns its path."""
    page = render_html(build_report(out, config, map_fn))
    path = out.path(REPORT_NAME)
    out.write_bytes(path, page.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}h3{font-size:14px;margin:18px 0 6px}
.sub{color:#5b6473;margin:0 0 16px;word-break:break-all}
.totals{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.totals div{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:8px 12px;min-width:90px}
.totals b{display:block;font-size:18px}
table{border-collapse:collapse;background:#fff;border:1px solid #dde2ea;width:100%}
th,td{padding:5px 8px;border-bottom:1px solid #eef1f5;text-align:left;vertical-align:top}
th{background:#f0f3f7;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.err{color:#8a1c1c;max-width:480px;word-break:break-word;font-size:12px}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.ok{background:#dcf2e0;color:#1d6b2c}.partial{background:#fff0c7;color:#7a5300}.failed{background:#fbd9d9;color:#8a1c1c}
.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;background:#fff;border:1px solid #dde2ea;border-radius:4px;padding:3px;text-align:center}
figure img{display:block}figcaption{font-size:11px;color:#5b6473}
.note{color:#5b6473;font-size:12px}.id{color:#8a93a3;font-size:11px;white-space:nowrap}
a{color:#1f5fbf;text-decoration:none}
#fkp-check{display:none}
"""

_JS = """
(function(){
  var table=document.getElementById('videos'), body=table.tBodies[0];
  var heads=Array.prototype.slice.call(table.tHead.rows[0].cells);
  function sortBy(key, desc){
    var idx=-1, num=false;
    heads.forEach(function(h,i){ if(h.dataset.key===key){idx=i; num=h.dataset.type==='num';} h.removeAttribute('aria-sort'); });
    if(idx<0) return;
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[idx].dataset.v, y=b.cells[idx].dataset.v, c;
      if(num){ x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y); c=x<y?-1:x>y?1:0; }
      else { c=x.localeCompare(y); }
      return desc?-c:c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    heads[idx].setAttribute('aria-sort', desc?'descending':'ascending');
  }
  heads.forEach(function(h){
    h.addEventListener('click', function(){ sortBy(h.dataset.key, h.getAttribute('aria-sort')==='ascending'); });
  });
  var m=/sort=([a-z_]+)(:desc)?/.exec(location.hash);
  if(m) sortBy(m[1], !!m[2]);
  function check(){
    var imgs=Array.prototype.slice.call(document.images);
    var out={rows:Array.prototype.map.call(body.rows,function(r){return r.dataset.id;}),
             images:imgs.length, loaded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length};
    document.getElementById('fkp-check').textContent=JSON.stringify(out);
  }
  if(document.readyState==='complete') check(); else window.addEventListener('load', check);
})();
"""

_COLUMNS = (  # key, header, numeric
    ("video", "video", False), ("status", "status", True), ("error", "error", False),
    ("frames", "frames decoded / expected", True), ("frames_with_faces", "frames with faces", True),
    ("faces", "faces", True), ("tracks", "tracks", True), ("seconds", "CPU seconds", True),
)


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(v) -> str:
    return "" if v is None else str(v)


def _fmt_int(v) -> str:
    return "" if v is None else f"{int(v):,}"


def _row_html(r: VideoRow, has_strip: bool) -> str:
    name = f'<a href="#v-{_e(r.video_id)}">{_e(r.name)}</a>' if has_strip else _e(r.name)
    err = r.error or ""
    short = err if len(err) <= 400 else err[:400] + "..."
    frames = f"{_fmt_int(r.frames_decoded)} / {_fmt_int(r.frames_expected)}" if r.frames_expected is not None else _fmt_int(r.frames_decoded)
    seconds = "" if r.seconds is None else f"{float(r.seconds):.1f}"
    cells = [
        f'<td data-v="{_e(r.path)}" title="{_e(r.path)}">{name}<div class="id">{_e(r.video_id)}</div></td>',
        f'<td data-v="{STATUS_RANK.get(r.status, -1)}"><span class="badge {_e(r.status)}">{_e(r.status)}</span></td>',
        f'<td class="err" data-v="{_e(err)}" title="{_e(err)}">{_e(short)}</td>',
        f'<td class="n" data-v="{_num(r.frames_decoded)}">{frames}</td>',
        f'<td class="n" data-v="{_num(r.frames_with_faces)}">{_fmt_int(r.frames_with_faces)}</td>',
        f'<td class="n" data-v="{_num(r.faces)}">{_fmt_int(r.faces)}</td>',
        f'<td class="n" data-v="{_num(r.tracks)}">{_fmt_int(r.tracks)}</td>',
        f'<td class="n" data-v="{_num(r.seconds)}">{seconds}</td>',
    ]
    return f'<tr data-id="{_e(r.video_id)}" data-status="{_e(r.status)}">{"".join(cells)}</tr>'


def _strip_html(r: VideoRow, t: VideoThumbs) -> str:
    figs = []
    for th in t.thumbnails:
        src = "data:image/jpeg;base64," + base64.b64encode(th.jpeg).decode("ascii")
        cap = f"track {th.track_id} &middot; frame {th.frame_index}<br>{th.timestamp_s:.2f} s"
        figs.append(f'<figure><img src="{src}" alt="track {th.track_id}, frame {th.frame_index}" '
                    f'width="{th.size}" height="{th.size}"><figcaption>{cap}</figcaption></figure>')
    notes = []
    if t.tracks and t.thumbnails:
        shown = len({th.track_id for th in t.thumbnails})
        if shown < t.tracks:
            notes.append(f"{shown} of {t.tracks} tracks shown (the longest)")
    if t.note:
        notes.append(t.note)
    note = f'<p class="note">{_e("; ".join(notes))}</p>' if notes else ""
    return (f'<section id="v-{_e(r.video_id)}"><h3>{_e(r.name)} <span class="badge {_e(r.status)}">{_e(r.status)}</span> '
            f'<span class="id">{_e(r.video_id)}</span></h3><div class="strip">{"".join(figs)}</div>{note}</section>')


def _totals(rows: list) -> list[tuple[str, str]]:
    """The page's totals, (label, formatted value): videos by status, frames, faces, tracks, CPU seconds."""
    counts = {s: sum(1 for r in rows if r.status == s) for s in STATUS_RANK}
    tot = lambda k: sum(getattr(r, k) or 0 for r in rows)  # noqa: E731
    return [
        ("videos", f"{len(rows):,}"), ("ok", f"{counts['ok']:,}"), ("partial", f"{counts['partial']:,}"),
        ("failed", f"{counts['failed']:,}"), ("frames decoded", f"{tot('frames_decoded'):,}"),
        ("frames with faces", f"{tot('frames_with_faces'):,}"), ("faces", f"{tot('faces'):,}"),
        ("tracks", f"{tot('tracks'):,}"), ("CPU seconds", f"{tot('seconds'):,.1f}"),
    ]


def render_html(report: RunReport) -> str:
    """The page (a string of HTML); every value escaped, nothing loaded from anywhere."""
    rows = list(report.videos)
    totals = _totals(rows)
    head = "".join(f'<th data-key="{k}" data-type="{"num" if num else "str"}">{_e(label)}</th>' for k, label, num in _COLUMNS)
    strips = [(r, report.thumbs[r.video_id]) for r in rows if r.video_id in report.thumbs]
    body = "".join(_row_html(r, r.video_id in report.thumbs) for r in rows)
    without = sum(1 for r in rows if r.status != "failed") - len(strips)
    more = f'<p class="note">{without} more video(s) without a strip (report limit)</p>' if without > 0 else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fkp run report: {_e(report.title)}</title><style>{_CSS}</style></head><body>",
        "<h1>fkp run report</h1>",
        f'<p class="sub">{_e(report.title)} &middot; generated {_e(report.generated_at)}</p>',
        '<div class="totals">' + "".join(f"<div><b>{v}</b>{_e(k)}</div>" for k, v in totals) + "</div>",
        "<h2>Videos</h2>",
        '<p class="note">Failed and partial first; click a header to sort.</p>',
        f'<table id="videos"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
        "<h2>Thumbnails</h2>",
        '<p class="note">A few frames of each track, decoded again from the input, with the keypoints drawn.</p>',
        "".join(_strip_html(r, t) for r, t in strips) or '<p class="note">none</p>',
        more,
        f'<pre id="fkp-check">{_e(json.dumps({"rows": [r.video_id for r in rows]}))}</pre>',
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)
