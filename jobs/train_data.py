"""The training job's data: the sources its flags name, checked once before any worker starts, and the course
archive fetched by ``--download``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from jobs.common import UsageError

log = logging.getLogger("fkp.train")

PUBLIC_ARCHIVE_URL = (
    "https://s3.amazonaws.com/video.udacity-data.com/topher/2018/May/5aea1b91_train-test-data/train-test-data.zip"
)


def default_data_dir() -> Path:
    """``$FKP_DATA/fkp`` when FKP_DATA is set, else ``data/`` in the working directory."""
    root = os.environ.get("FKP_DATA")
    return Path(root) / "fkp" if root else Path("data")


def download_course_data(url: str, dest: Path) -> Path:
    """Fetch the course archive and unpack it so that ``dest`` holds the course layout."""
    from fkp_core.dataset import detect_kind

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "train-test-data.zip"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as out:
                shutil.copyfileobj(resp, out)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot download {url}: {exc}") from exc
        try:
            with zipfile.ZipFile(archive) as zf:
                unpacked = Path(tmp) / "unpacked"
                for member in zf.infolist():
                    target = (unpacked / member.filename).resolve()
                    if not str(target).startswith(str(unpacked.resolve())):
                        raise UsageError(f"{url}: archive member {member.filename!r} escapes the target folder")
                zf.extractall(unpacked)
        except zipfile.BadZipFile as exc:
            raise UsageError(f"{url}: not a zip archive ({exc})") from exc
        # the layout may sit at the top of the archive or one folder down
        candidates = [unpacked, *[p for p in unpacked.iterdir() if p.is_dir()]]
        root = next((c for c in candidates if (c / "training_frames_keypoints.csv").is_file()), None)
        if root is None:
            raise UsageError(f"{url}: archive does not hold training_frames_keypoints.csv")
        for item in root.iterdir():
            if item.name.startswith("__MACOSX"):
                continue
            target = dest / item.name
            if not target.exists():
                shutil.move(str(item), str(target))
    detect_kind(dest)
    return dest


def resolve_sources(args: argparse.Namespace):
    """The training and validation-only sources named by the flags, checked to exist."""
    from fkp_core.dataset import DatasetError
    from fkp_core.training import check_split

    train, val = _parse_sources(args)
    for src in train + val:  # read once here: a bad row or image fails now, in one line, not in every worker
        try:
            records = src.read("training") if src.kind == "course" else src.read()
            if src in train:
                check_split(src, records, args.val_fraction)
        except DatasetError as exc:
            raise UsageError(str(exc)) from None
        log.info("data source %s (%s): %d faces, weight %g", src.label, src.path, len(records), src.weight)
    return train, val


def _parse_sources(args: argparse.Namespace):
    """``--data`` (default: the data dir, downloaded first with ``--download``) and ``--val-data`` as sources with distinct names."""
    from fkp_core.dataset import DatasetError, parse_source

    specs = args.data or [str(default_data_dir())]
    if args.download and not args.data:
        target = default_data_dir()
        if not (target / "training_frames_keypoints.csv").is_file():
            download_course_data(args.download_url, target)
    try:
        train = [parse_source(s) for s in specs]
        val = [parse_source(s) for s in args.val_data]
    except DatasetError as exc:
        if not args.data:
            raise UsageError(
                f"{exc}. Get the course data with --download (fetches {PUBLIC_ARCHIVE_URL}), "
                "point --data at it, or set FKP_DATA"
            ) from None
        raise UsageError(str(exc)) from None
    labels = [s.label for s in train + val]
    if len(set(labels)) != len(labels):
        raise UsageError(f"data sources need distinct names, got {labels}")
    return train, val
