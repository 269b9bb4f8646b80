"""Compare the rows of two annotate output folders (a refactor's check: the same inputs must give the same rows).

    python -m jobs.compare OLD_OUT NEW_OUT [--json docs/bench/rows-compare.json]

Videos are paired by file name (their ids differ when the inputs sit in different folders). Every
column of the faces table is compared exactly except ``video_id`` and ``video_path``; of the per-video
table every column except the path, id, output, render and timing ones. Exit 0 when all are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import Parser, run_main

IGNORED_FACE_COLUMNS = ("video_id", "video_path")
IGNORED_VIDEO_COLUMNS = ("video_id", "path", "output", "render", "seconds", "finished_at")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="output folder of the reference run")
    p.add_argument("new", help="output folder of the run to check")
    p.add_argument("--json", default=None, help="also write the comparison here")
    return p


def _stem(video_id: str) -> str:
    return video_id.rsplit("-", 1)[0]  # video ids are <stem>-<8 hex of the path's hash>


def _equal(a, b) -> bool:
    import numpy as np

    a, b = a.to_numpy(), b.to_numpy()
    if a.dtype == object:
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def _same_value(x, y) -> bool:
    import numpy as np
    import pandas as pd

    if np.ndim(x) == 0 and np.ndim(y) == 0 and pd.isna(x) and pd.isna(y):
        return True  # a null in both
    return bool(np.array_equal(np.asarray(x), np.asarray(y)))


def compare_video(old_part: Path, new_part: Path) -> dict:
    import pandas as pd

    old, new = pd.read_parquet(old_part), pd.read_parquet(new_part)
    columns = [c for c in old.columns if c not in IGNORED_FACE_COLUMNS]
    same = list(old.columns) == list(new.columns) and len(old) == len(new)
    differ = [c for c in columns if not same or not _equal(old[c], new[c])]
    return {"rows_old": len(old), "rows_new": len(new), "columns_compared": columns, "columns_differing": differ,
            "identical": same and not differ}


def compare_outputs(old: Path, new: Path) -> dict:
    import pandas as pd

    vo = pd.read_parquet(old / "_videos.parquet").set_index("video_id")
    vn = pd.read_parquet(new / "_videos.parquet").set_index("video_id")
    by_stem = {_stem(v): v for v in vn.index}
    videos = {}
    for vid in vo.index:
        nid = by_stem.get(_stem(vid))
        if nid is None:
            videos[_stem(vid)] = {"identical": False, "missing": True}
            continue
        entry = compare_video(old / f"part-{vid}.parquet", new / f"part-{nid}.parquet")
        cols = [c for c in vo.columns if c not in IGNORED_VIDEO_COLUMNS]
        entry["video_columns_differing"] = [c for c in cols if not _equal(vo.loc[[vid], c], vn.loc[[nid], c])]
        entry["identical"] = entry["identical"] and not entry["video_columns_differing"]
        videos[_stem(vid)] = entry
    return {"old": str(old), "new": str(new), "videos": videos, "identical": all(v["identical"] for v in videos.values())}


def run(args: argparse.Namespace) -> int:
    result = compare_outputs(Path(args.old), Path(args.new))
    for name, v in result["videos"].items():
        print(f"{name}: " + ("missing in the new output" if v.get("missing") else
                             f"{v['rows_old']} vs {v['rows_new']} rows; " + ("identical" if v["identical"] else
                             f"differ in {v['columns_differing'] + v['video_columns_differing']}")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["identical"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.compare", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
