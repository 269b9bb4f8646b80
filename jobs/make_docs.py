"""Regenerate the README's filter picture: every filter rendered by jobs.annotate on one real photo.

    python -m jobs.make_docs --photo ../shared/data/photos/udacity_obamas.jpg --out docs/filters.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from jobs.common import EXIT_OK, Parser, UsageError, add_common_flags, positive_int, run_main

FILTER_SETS = ("keypoints", "box", "axis", "sunglasses", "moustache", "sunglasses,moustache", "blur", "pixelate")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.make_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--photo", required=True, help="a photo with faces")
    p.add_argument("--out", default="docs/filters.png", help="PNG to write")
    p.add_argument("--tile", type=positive_int, default=260, help="side of each picture in the grid, pixels")
    add_common_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from fkp_core.dataset import read_image
    from fkp_core.viz import sample_grid, write_png
    from jobs import annotate

    if not Path(args.photo).is_file():
        raise UsageError(f"{args.photo}: no such file")
    pictures = []
    with tempfile.TemporaryDirectory() as tmp:
        boxes = None
        for i, filters in enumerate(FILTER_SETS):
            code = annotate.main([args.photo, "--out", f"{tmp}/out{i}", "--render", f"{tmp}/img{i}", "--filter", filters, "-q"])
            if code != 0:
                raise UsageError(f"annotating {args.photo} failed (exit {code})")
            rendered = next(Path(f"{tmp}/img{i}").iterdir())
            pictures.append(read_image(rendered, color=True))
            if boxes is None:
                import pandas as pd

                df = pd.read_parquet(f"{tmp}/out{i}")
                boxes = df[["box_x", "box_y", "box_w", "box_h"]].to_numpy()
    # crop all pictures to the faces with a margin, so the grid shows the effects large
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    m = int(0.25 * max(x1 - x0, y1 - y0))
    h, w = pictures[0].shape[:2]
    ys, xs = slice(max(0, int(y0) - m), min(h, int(y1) + m)), slice(max(0, int(x0) - m), min(w, int(x1) + m))
    crops = [np.ascontiguousarray(p[ys, xs]) for p in pictures]
    write_png(args.out, sample_grid(crops, labels=list(FILTER_SETS), columns=4, tile=args.tile))
    print(f"wrote {args.out}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.make_docs", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
