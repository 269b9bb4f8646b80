"""Opening inputs, local paths or pyarrow filesystem URIs, with a plain reason when that fails.

A URI is read through ``pyarrow.fs`` (random access, so seeking works as on a local file), which lets
cluster workers read the videos from an object store.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from fkp_core.video.errors import VideoError


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` names, which are read through pyarrow's filesystems."""
    return isinstance(path, str) and "://" in path


@dataclass(frozen=True)
class RemoteFile:
    """A file named by a pyarrow filesystem URI: the few ``Path`` attributes this module uses."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.uri).path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @cached_property
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path inside it), made once per file (an object store's client is not free)."""
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise VideoError(self.uri, f"cannot open this URI ({exc})") from None

    def open(self) -> pa.NativeFile:
        fs, inner = self.filesystem
        try:
            return fs.open_input_file(inner)
        except PermissionError:
            raise VideoError(self.uri, "permission denied (file not readable)") from None
        except (pa.ArrowException, OSError) as exc:
            raise VideoError(self.uri, f"cannot read file: {exc}") from None


def _check_remote(r: RemoteFile) -> RemoteFile:
    """One metadata request; an unreadable file fails when it is opened (``RemoteFile.open``)."""
    fs, inner = r.filesystem
    try:
        info = fs.get_file_info(inner)
    except (pa.ArrowException, OSError) as exc:
        raise VideoError(r.uri, f"cannot read file: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise VideoError(r.uri, "file not found")
    if info.type == pafs.FileType.Directory:
        raise VideoError(r.uri, "is a directory, not a video")
    if info.size == 0:
        raise VideoError(r.uri, "empty file (0 bytes)")
    return r


def _check_readable(path: str | os.PathLike) -> Path | RemoteFile:
    """Turn the usual file-system failures into a VideoError with a plain reason."""
    if is_uri(path):
        return _check_remote(RemoteFile(str(path)))
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise VideoError(p, "symbolic link loop (the link leads back to itself)") from None
            raise VideoError(p, f"broken symbolic link (its target {os.readlink(p)} does not exist)")
        raise VideoError(p, "file not found")
    if p.is_dir():
        raise VideoError(p, "is a directory, not a video")
    try:
        with open(p, "rb") as f:
            head = f.read(1)
    except PermissionError:
        raise VideoError(p, "permission denied (file not readable)") from None
    except OSError as e:
        raise VideoError(p, f"cannot read file: {e.strerror or e}") from None
    if not head:
        raise VideoError(p, "empty file (0 bytes)")
    return p


def _open(p: Path | RemoteFile) -> av.container.InputContainer:
    try:
        # the container keeps the pyarrow file (closed when the container is released)
        return av.open(p.open() if isinstance(p, RemoteFile) else str(p), "r")
    except av.error.FFmpegError as e:
        raise VideoError(p, f"not a video or image FFmpeg can read ({_ffmpeg_reason(e)})") from None


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return re.sub(r"^\[Errno -?\d+\]\s*", "", str(msg))


def _decode_image(p: Path, gray: bool) -> np.ndarray:
    """cv2.imdecode (which applies EXIF orientation, so the pixels are upright)."""
    if isinstance(p, RemoteFile):
        with p.open() as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    else:
        data = np.fromfile(p, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise VideoError(p, "not an image OpenCV can decode")
    return img
