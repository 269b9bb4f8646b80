"""Write the run report OUT/_report.html: one static page, per-video table, totals, keypoint thumbnails.

    python -m jobs.report landmarks.parquet

jobs.annotate writes it at the end of every run; this rebuilds it (other limits, an interrupted run,
inputs that were offline). Thumbnails are decoded again from the inputs; with RAY_ADDRESS set, or
inside a job that already runs Ray, one task per video makes them. Exit codes: 0 written, 2 usage
error (not an fkp output folder, bad flags).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import EXIT_OK, Parser, Ranged, UsageError, add_common_flags, non_negative_int, run_main

log = logging.getLogger("fkp.report")


def build_parser() -> argparse.ArgumentParser:
    from fkp_core.report import ReportConfig

    d = ReportConfig()
    p = Parser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="the output folder of jobs.annotate (local path or pyarrow filesystem URI such as s3://bucket/run)")
    p.add_argument("--per-track", type=non_negative_int, default=d.per_track, help="thumbnails per track, spread over its frames (0: no thumbnails)")
    p.add_argument("--max-tracks", type=non_negative_int, default=d.max_tracks, help="tracks per video with thumbnails (the longest ones)")
    p.add_argument("--max-videos", type=non_negative_int, default=d.max_videos,
                   help="videos with a thumbnail strip, in table order (failed and partial first); every video is in the table")
    p.add_argument("--thumb-size", type=Ranged(int, 16), default=d.size, help="thumbnail side in pixels")
    add_common_flags(p)
    return p


def ray_map():
    """A map that runs each call as a Ray task when Ray is running (or RAY_ADDRESS names a cluster), else None."""
    import os

    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return None
        from jobs.common import init_ray

        init_ray()

    def map_fn(fn, items):
        remote = ray.remote(_apply).options(num_cpus=0.25, max_retries=1)  # light, like the probe and finalize tasks
        return ray.get([remote.remote(fn, item) for item in items])

    return map_fn


def _apply(fn, item):
    return fn(item)


def write_run_report(out, quiet: bool = False) -> str | None:
    """The end-of-run hook of jobs.annotate: writes OUT/_report.html; a failure is logged, never raised."""
    from fkp_core.report import write_report

    try:
        path = write_report(out, map_fn=ray_map() or map)
    except Exception as exc:  # noqa: BLE001 - the run's results matter more than its report
        log.warning("run report not written: %s: %s", type(exc).__name__, exc)
        return None
    if not quiet:
        log.info("run report: %s", path)
    return path


def run(args: argparse.Namespace) -> int:
    from fkp_core.report import ReportConfig, is_output, write_report
    from fkp_core.store import open_output

    try:
        out = open_output(args.out)
        if not is_output(out):
            raise UsageError(f"{out.uri}: not an fkp output folder (no _videos.parquet or _status/)")
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    config = ReportConfig(per_track=args.per_track, max_tracks=args.max_tracks, max_videos=args.max_videos, size=args.thumb_size)
    path = write_report(out, config, map_fn=ray_map() or map)
    if not args.quiet:
        print(f"report: {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.report", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
