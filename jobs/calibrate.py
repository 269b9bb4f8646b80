"""Measure a detector's box-to-crop calibration on labelled training faces (never on evaluation faces).

    python -m jobs.calibrate --detector yunet --data course:data/fkp --data ibug:data/300w/helen

Prints the fitted fkp_core.detector.BoxCalibration (the constants recorded with the detector in
fkp_core/detector.py) and how well it holds, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

from jobs.common import EXIT_OK, Parser, UsageError, add_common_flags, add_detector_flags, detector_spec, positive_int, run_main

log = logging.getLogger("fkp.calibrate")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m jobs.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", metavar="[KIND:]PATH", required=True,
                   help="labelled training source, repeatable (course layout: its training split; or an iBUG .pts folder)")
    p.add_argument("--every", type=positive_int, action="append", default=None,
                   help="use every Nth face of the matching --data (repeatable, in --data order; default: every face)")
    p.add_argument("--side", default="width", choices=["width", "max"], help="which side of the detector's box the crop side follows")
    p.add_argument("--out", default=None, help="JSON file for the result (default: print only)")
    add_detector_flags(p.add_argument_group("detection (as jobs.annotate)"))
    add_common_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    import cv2

    from fkp_core.calibration import measure_calibration
    from fkp_core.dataset import DatasetError, parse_source, read_image
    from fkp_core.detector import make_detector

    cv2.setNumThreads(1)
    every = args.every or [1] * len(args.data)
    if len(every) != len(args.data):
        raise UsageError("--every: give one per --data, or none")
    samples = []
    try:
        for spec, n in zip(args.data, every):
            src = parse_source(spec)
            if "afw" in src.label.lower():
                raise UsageError(f"{spec}: AFW is for validation only, never for calibration")
            records = (src.read("training") if src.kind == "course" else src.read())[::n]
            samples += [(read_image(r.image_path), r.keypoints) for r in records]
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    detector = make_detector(detector_spec(args))  # its raw boxes are measured; its own calibration is not used
    result = measure_calibration(detector, samples, side=args.side, source=args.command)
    print(f"{args.detector}: {result.matched} of {result.faces} faces matched; {result.calibration}")
    print(f"spread (IQR): scale {result.scale_iqr:.4f}, shift {result.shift_iqr[0]:.4f} / {result.shift_iqr[1]:.4f}; "
          f"median crop-centre error after calibration {result.crop_error:.4f} of the crop side")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**asdict(replace(result, calibration=asdict(result.calibration)))}, indent=2) + "\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("jobs.calibrate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
