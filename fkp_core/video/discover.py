"""Input discovery: the media files named by files, folders, glob patterns and URIs; stable video ids."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from fkp_core.constants import IMAGE_EXTENSIONS
from fkp_core.video.files import RemoteFile, is_uri


VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
)
MEDIA_EXTENSIONS: tuple[str, ...] = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


def _is_media(p: Path) -> bool:
    return p.suffix.lower() in MEDIA_EXTENSIONS and not p.name.startswith(".")


def _walk(root: Path, notes: list[str] | None = None) -> Iterable[Path]:
    """Media files under ``root``, skipping hidden files and folders (temporary outputs, ._ files).

    A link with a media name that leads nowhere (broken, or a loop) is yielded too, so that it is reported
    as a failed input rather than missed in silence; a folder with a media name is searched, and noted.
    """
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs:
            if notes is not None and _is_media(Path(name)):
                notes.append(f"{Path(folder) / name} is a folder, not a video: searched it for videos")
        for name in files:
            p = Path(folder) / name
            if _is_media(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
                yield p


def find_media(inputs: Iterable[str | os.PathLike], notes: list[str] | None = None) -> list[Path | str]:
    """The media files named by ``inputs`` (files, folders, glob patterns, URIs): unique, sorted.

    Local files come back as resolved ``Path``s, files named by URI as URI strings. A name typed
    by the user is taken as is, whatever its extension (the job records it as failed if it is not
    a video); a file *found* in a folder or by a glob must have a video or image extension (any
    case) and not be hidden. A missing plain input raises FileNotFoundError (an unusable URI:
    ValueError); a folder or pattern matching nothing contributes nothing (the caller decides).
    ``notes`` (a list) receives what a user should hear about, such as a folder named like a video.
    """
    found: set[Path | str] = set()
    for item in inputs:
        text = os.fspath(item)
        if is_uri(text):
            found.update(_find_remote(text))
            continue
        if glob.has_magic(text) and not Path(text).expanduser().exists():  # "clip [1].mp4" is a name
            found.update(_find_glob(text, notes))
        else:
            found.update(_find_local(text, notes))
    return sorted(found, key=str)


def _find_glob(pattern: str, notes: list[str] | None) -> Iterator[Path]:
    """``find_media`` for a local glob pattern: media files it matches, and those under folders it matches."""
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
        m = Path(match)
        if m.is_dir():
            yield from (_resolved(q) for q in _walk(m, notes))
        elif _is_media(m) and m.is_file():
            yield m.resolve()


def _find_local(text: str, notes: list[str] | None) -> Iterator[Path]:
    """``find_media`` for a local name: the file itself (whatever its extension), or the media under a folder."""
    p = Path(text).expanduser()
    if p.is_dir():
        if notes is not None and _is_media(p):
            notes.append(f"{text} is a folder, not a video: searched it for videos")
        yield from (_resolved(q) for q in _walk(p, notes))
    elif p.exists() or p.is_symlink():  # a broken link or a loop: a failed input with its reason
        yield _resolved(p)
    else:
        raise FileNotFoundError(f"input not found: {text}")


def _resolved(p: Path) -> Path:
    """The absolute path with links followed; a link that leads nowhere stays as the link itself."""
    return p.resolve() if p.exists() else Path(os.path.abspath(p))


def _find_remote(uri: str) -> list[str]:
    """``find_media`` for one URI: a file, a folder (recursive) or a glob pattern in its path."""
    parts = urlsplit(uri)
    pattern = glob.has_magic(parts.path)
    if pattern:  # list the folder before the first wildcard, match the pattern against what is there
        head = parts.path[: re.search(r"[*?[]", parts.path).start()].rsplit("/", 1)[0]
        parts_dir = parts._replace(path=head or "/")
    else:
        parts_dir = parts
    try:
        fs, root = pafs.FileSystem.from_uri(parts_dir.geturl())
        info = fs.get_file_info(root)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{uri}: cannot open this input location ({exc})") from None

    if info.type == pafs.FileType.File and not pattern:
        return [uri]
    if info.type != pafs.FileType.Directory:
        if pattern:
            return []
        raise FileNotFoundError(f"input not found: {uri}")
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = []
    for f in listing:
        rel = f.path[len(root.rstrip("/")):].lstrip("/")
        if f.type != pafs.FileType.File or any(part.startswith(".") for part in rel.split("/")):
            continue
        child = parts_dir._replace(path=f"{parts_dir.path.rstrip('/')}/{rel}").geturl()  # same scheme, host, query
        if pattern and not fnmatch.fnmatchcase(urlsplit(child).path, parts.path):
            continue
        if PurePosixPath(rel).suffix.lower() in MEDIA_EXTENSIONS:
            found.append(child)
    return found


def video_id(path: str | os.PathLike) -> str:
    """A stable, file-name-safe id: the sanitised stem + '-' + 8 hex of sha1(resolved absolute path).

    The stem keeps ids readable; the hash keeps two ``clip.mp4`` in different folders apart. A
    URI is hashed as written.
    """
    p = RemoteFile(path) if is_uri(path) else _resolved(Path(path).expanduser())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem).strip("._-")[:64] or "video"
    return f"{stem}-{hashlib.sha1(str(p).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
