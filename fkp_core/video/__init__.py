"""Video in and out: probe a file, decode an exact frame range, encode an mp4, list inputs.

The annotate job splits each video into frame segments ``[start, end)`` decoded by parallel
tasks, so two promises matter more than speed:

* **A frame's index depends only on the frame.** It is computed from its presentation timestamp,
  ``round((pts - first_pts) * time_base * rate)`` with ``first_pts`` the timestamp of the first
  frame a decode from the start of the file outputs and ``rate`` the stream's frame rate. Two
  tasks that start decoding at different keyframes therefore give the same frame the same index,
  every frame of the file falls in exactly one segment, and a frame lost to corrupt data does not
  shift the frames after it (a frame *counter* would). For constant-frame-rate video, which is
  what cameras and encoders write, this equals the position in a sequential decode (tested on
  H.264 with B-frames, open GOPs, MPEG-4 Part 2 in AVI, Matroska, MPEG-TS and NTSC rates).
* **Seeking is checked, never trusted.** ``read_frames`` seeks (backward, keyframes only) to the
  timestamp of ``start``, decodes forward and drops frames before ``start``. Some demuxers land
  *after* the target (AVI and MPEG-TS index by decode time, open-GOP leading pictures cannot be
  decoded after a seek), so the first decoded frame is checked: if it is past ``start`` the seek
  is retried further back (1, 4, 16, 64 s) and finally the file is decoded from its beginning.

Streams without timestamps (raw ``.h264``) are decoded from the beginning with a counter. Variable
frame rate video is mapped onto the nominal rate's grid: a frame whose index is already taken is
dropped and an index no frame maps to is skipped; both are counted in ``DecodeStats`` (for
phone-style jitter, under half a frame, rounding absorbs it and nothing is dropped). ``probe`` says when
that happens (``VideoInfo.variable_rate``: timestamps off the grid, a screen recording), and
``read_frames(sequential=True)`` then numbers every frame in decoding order instead (one decode from the
start: no seeking, so no parallel segments for such video).

Frames are returned as stored: ``VideoInfo.rotation`` reports the display rotation (phones store
portrait video as landscape plus a rotation) and ``read_frames(upright=True)`` applies it, for
detectors that need upright faces; keypoints are then in display coordinates.

Still images (``IMAGE_EXTENSIONS``, or a file FFmpeg recognises as an image) are 1-frame videos.

Inputs are local paths or pyarrow filesystem URIs (``s3://bucket/clips/a.mp4``, ``gs://...``,
``hdfs://...``, ``file:///...``): a URI is read through ``pyarrow.fs`` (random access, so seeking
works as on a local file), which lets cluster workers read the videos from an object store.

One concept a module: ``probe`` (VideoInfo), ``decode`` (read_frames), ``write`` (VideoWriter),
``discover`` (find_media, video_id), and what they share: ``errors``, ``files`` (opening paths and
URIs), ``stream`` (the stream, its frame-rate grid, rotation), ``pixels`` (frames to arrays). The
names below are the package's interface; import them from ``fkp_core.video``.
"""

from fkp_core.constants import IMAGE_EXTENSIONS
from fkp_core.video.decode import DecodedFrame, DecodeStats, read_frames
from fkp_core.video.discover import MEDIA_EXTENSIONS, VIDEO_EXTENSIONS, find_media, video_id
from fkp_core.video.errors import VideoError
from fkp_core.video.files import RemoteFile, is_uri
# the gray conversion and the table it must equal, for tests/test_video.py
from fkp_core.video.pixels import _LIMITED_TO_FULL, _limited_to_full, apply_rotation  # noqa: F401
from fkp_core.video.probe import VFR_SCAN_PACKETS, VideoInfo, probe
from fkp_core.video.write import VideoWriter, h264_available

__all__ = [
    "IMAGE_EXTENSIONS", "MEDIA_EXTENSIONS", "VIDEO_EXTENSIONS", "VFR_SCAN_PACKETS",
    "DecodedFrame", "DecodeStats", "RemoteFile", "VideoError", "VideoInfo", "VideoWriter",
    "apply_rotation", "find_media", "h264_available", "is_uri", "probe", "read_frames", "video_id",
]
