"""Export an fkp output folder to OpenFace 2.x CSV, a plain wide CSV or JSON lines, one file per video.

    python -m jobs.export landmarks.parquet --format openface [--dest DIR]

Each part file is streamed record batch by record batch (never a whole video in memory) and each
export file is published whole when it is complete. Works on local folders and pyarrow filesystem
URIs (s3://bucket/run, file:///...). Exit codes: 0 done, 2 usage error (not an fkp output, bad flags).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys

from jobs.common import EXIT_OK, Parser, UsageError, add_common_flags, positive_int, run_main

log = logging.getLogger("fkp.export")


def build_parser() -> argparse.ArgumentParser:
    from fkp_core.export import DEFAULT_BATCH_ROWS, FORMATS

    p = Parser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="the output folder of jobs.annotate (local path or pyarrow filesystem URI such as s3://bucket/run)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="openface: OpenFace 2.x FeatureExtraction CSV columns (frame, face_id, timestamp, confidence, success, "
                        "pose_Rx..pose_Rz in radians, x_0..x_67, y_0..y_67; README: Export); csv: every column, keypoints as "
                        "x_0..x_67, y_0..y_67; jsonl: one JSON object per face row")
    p.add_argument("--dest", default=None,
                   help="folder (local path or URI) for the files DEST/<video_id>.csv|.jsonl (default: OUT/_export/<format>, "
                        "which readers of the Parquet folder ignore)")
    p.add_argument("--videos", default=None, metavar="PATTERN",
                   help="export only videos whose video_id matches this glob pattern (default: every video with a part file)")
    p.add_argument("--raw", action="store_true", help="csv and jsonl: also write keypoints_raw (the unsmoothed CNN output)")
    p.add_argument("--batch-rows", type=positive_int, default=DEFAULT_BATCH_ROWS, help="rows read, formatted and written at a time (bounds memory)")
    add_common_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    from fkp_core.export import NotAnOutputError, export_part, list_parts
    from fkp_core.store import open_output

    if args.batch_rows < 1:
        raise UsageError("--batch-rows must be >= 1")
    try:
        out = open_output(args.out)
        dest = open_output(args.dest) if args.dest else open_output(out.uri.rstrip("/") + f"/_export/{args.format}")
        parts = list_parts(out)
    except (ValueError, OSError) as exc:  # NotAnOutputError is a ValueError
        raise UsageError(str(exc)) from None
    if args.videos:
        parts = [p for p in parts if fnmatch.fnmatchcase(p.video_id, args.videos)]
        if not parts:
            raise UsageError(f"--videos {args.videos}: no video of {out.uri} matches")
    rows = 0
    for part in parts:
        try:
            result = export_part(out, part, args.format, dest, batch_rows=args.batch_rows, raw=args.raw)
        except NotAnOutputError as exc:
            raise UsageError(str(exc)) from None
        rows += result.rows
        log.debug("%s: %d rows in %d batches -> %s", part.video_id, result.rows, result.batches, result.path)
    if not args.quiet:
        print(f"{len(parts)} video(s), {rows} face rows -> {dest.uri} ({args.format})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.export", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
