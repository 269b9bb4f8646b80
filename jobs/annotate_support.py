"""Driver-side bookkeeping of jobs.annotate: progress within segments, which inputs changed, which files are
fkp's own outputs, resources no node has, tidying the output folder. No Ray at import time."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from jobs.common import UsageError

log = logging.getLogger("fkp.annotate")


class Progress:
    """Frames each running segment has taken so far, for the driver's progress bar (a retried segment starts again
    from 0, since it sets its count rather than adding to it)."""

    def __init__(self):
        self.frames: dict[str, int] = {}

    def set(self, key: str, frames: int) -> None:
        self.frames[key] = frames

    def snapshot(self) -> dict[str, int]:
        return dict(self.frames)


def progress_key(video_id: str, start: int) -> str:
    return f"{video_id}/{start}"



def source_identity(path: str) -> dict | None:
    """What tells a file from another one put at the same path: its size and modification time (None: unknown)."""
    from fkp_core.video import is_uri

    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            fs, where = pafs.FileSystem.from_uri(path)
            info = fs.get_file_info(where)
            return {"size": info.size, "mtime_ns": info.mtime_ns} if info.type == pafs.FileType.File else None
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except (OSError, ValueError):
        return None



def not_outputs(paths: list, out, render: str | None) -> list:
    """The inputs less fkp's own outputs (files under --out or --render): a re-run never annotates them."""
    roots = [Path(r) for r in ((out.root,) if out.is_local else ()) + ((render,) if render else ())]
    keep = [p for p in paths if not (isinstance(p, Path) and any(r == p or r in p.parents for r in roots))]
    if len(keep) < len(paths):
        log.info("skipping %d file(s) under --out or --render (outputs of fkp are never inputs)", len(paths) - len(keep))
    return keep


def check_resources(args: argparse.Namespace, resources: dict | None) -> None:
    """Refuse segment tasks no node can ever run (they would wait forever): before Ray starts, against the CPUs a
    local instance gets; after, against the largest node (on a cluster an autoscaler may still add one)."""
    if resources is None:
        if os.environ.get("RAY_ADDRESS"):
            return
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda, but this machine has no GPU Ray can use")
        cpus, where = (args.num_cpus, f"the local Ray instance (--num-cpus {args.num_cpus})") if args.num_cpus else (os.cpu_count() or 1, "this machine")
    else:
        import ray

        cpus = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        where = "the largest node of the Ray cluster"
    if args.cpus_per_segment > cpus:
        message = (f"--cpus-per-segment {args.cpus_per_segment:g}: {where} has {cpus:g} CPU(s), so no segment task "
                   "could ever start")
        if resources is None or not os.environ.get("RAY_ADDRESS"):
            raise UsageError(message)
        log.warning("%s; waiting for the autoscaler to add a larger node", message)



def remove_if_empty(out, folder: str) -> None:
    import pyarrow.fs as pafs

    if out.exists(folder) and not out.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        out.remove_dir(folder)
