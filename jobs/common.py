"""What every entry point shares: one-line usage errors (exit 2), logging, and starting or joining Ray."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROJECT_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("fkp")


class UsageError(Exception):
    """Bad flags or inputs: printed as one line, exit code 2."""


class Ranged:
    """An argparse ``type=``: a number of ``kind`` (int or float) in a range, checked at parse time.

    A value out of range or not a number is a one-line usage error that states the range, and
    ``--help`` states it after each flag's help. ``accepts`` and ``text`` tell tests the range.
    """

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, note: str = ""):
        self.kind, self.low, self.high, self.low_open, self.high_open, self.note = kind, low, high, low_open, high_open, note
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    @property
    def text(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        fmt = lambda v: f"{v:g}"  # noqa: E731
        if self.low is not None and self.high is not None:
            rng = f"{what} in {'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            rng = f"{what} {'>' if self.low_open else '>='} {fmt(self.low)}"
        elif self.high is not None:
            rng = f"{what} {'<' if self.high_open else '<='} {fmt(self.high)}"
        else:
            rng = what
        return f"{rng} ({self.note})" if self.note else rng

    def accepts(self, value: float) -> bool:
        if self.kind is float and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid {self.kind.__name__} value: {text!r}: must be {self.text}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {self.text}")
        return value

    def __repr__(self) -> str:
        return f"Ranged({self.text})"


positive_int = Ranged(int, 1)
non_negative_int = Ranged(int, 0)
positive_float = Ranged(float, 0, low_open=True)
non_negative_float = Ranged(float, 0)
unit_interval = Ranged(float, 0, 1)  # a probability
fraction = Ranged(float, 0, 1, low_open=True, high_open=True)  # strictly between 0 and 1
share = Ranged(float, 0, 1, low_open=True)  # (0, 1]: a part of something, all of it included


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each numeric flag's range, and defaults except None (those flags' help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is not None and isinstance(action.type, Ranged):
            text = f"{text} [{action.type.text}]"
        if action.default is None or text is None:
            return text
        saved = action.help
        action.help = text
        try:
            return super()._get_help_string(action)
        finally:
            action.help = saved


_HelpFormatter = HelpFormatter


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def refuse_validation_sources(sources) -> None:
    """Settings are chosen on training faces only: AFW (validation only) is a usage error."""
    if any("afw" in src.label.lower() for src in sources):
        raise UsageError("--data: AFW is for validation only, never for choosing settings")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fkp").setLevel(level)


def run_main(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None) -> int:
    """Parse, run, and map failures to exit codes: UsageError -> 2, Ctrl-C -> 130.

    ``args.command`` is the command line as typed (recorded in model metadata and reports).
    """
    args = parser.parse_args(argv)
    args.command = f"python -m {prog} " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv])
    setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        return run(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to finish the remaining work", file=sys.stderr)
        return EXIT_INTERRUPTED


def ray_env_defaults() -> None:
    """Environment every Ray process of ours needs on small machines (see the project notes)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a plain ray.init() otherwise turns token auth on
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Ray Train's placement-group cleaner asks the state API once a second whether the run's controller
# is alive; without a dashboard (the embedded instance) every call fails and it warns each time:
# ~850 identical lines over a 14-minute training run. It only matters on a cluster, which has one.
_NOISY_WITHOUT_DASHBOARD = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Worker-process set-up hook of the embedded instance: silences the warnings above (errors still show)."""
    for name in _NOISY_WITHOUT_DASHBOARD:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, quiet: bool = True) -> str:
    """Join the cluster at ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else start a local one.

    Returns "cluster" or "local". A local instance gets the project on its workers' path, a short
    temp dir (unix socket paths are limited) and no dashboard (start-up cost on small machines).
    """
    import ray

    ray_env_defaults()
    if ray.is_initialized():
        return "cluster" if os.environ.get("RAY_ADDRESS") else "local"
    kwargs: dict = {"logging_level": logging.WARNING if quiet else logging.INFO}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {_first_line(exc)}") from None
        return "cluster"
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    temp_dir = os.environ.get("FKP_RAY_TEMP_DIR") or os.path.join(tempfile.gettempdir(), f"fkp-ray-{os.getuid()}")
    try:
        ray.init(
            # "local": always an instance of our own, never whatever `ray start` last left in the temp dir (Ray
            # would join that one, or refuse num_cpus with a traceback when it is there)
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]},
                         "worker_process_setup_hook": "jobs.common.quiet_worker_logs"},
            **kwargs,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot start a local Ray instance (temp dir {temp_dir}): {_first_line(exc)}") from None
    return "local"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def cluster_node_count() -> int:
    """Alive nodes in the Ray cluster (1 for the embedded instance)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def use_gpus(device: str, mode: str) -> tuple[dict[str, float], bool]:
    """(the cluster's resources, whether to run on GPUs) for ``--device auto|cpu|cuda``.

    ``cuda`` with no GPU is a usage error on a local instance; on a cluster the job asks for GPUs
    anyway, since an autoscaler adds GPU nodes when tasks ask for them (a GPU group may start at 0).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        if mode == "local":
            raise UsageError("--device cuda, but this machine has no GPU Ray can use")
        log.warning("no GPU in the cluster yet: asking for them, the autoscaler has to add GPU nodes")
    return resources, device == "cuda" or (device == "auto" and gpus > 0)


def load_model_arg(path, device: str = "cpu", flag: str | None = None):
    """A model named on the command line (None: the bundled one), or a one-line usage error naming ``flag``."""
    from fkp_core.weights import ModelFileError, load_model

    try:
        return load_model(path, device=device)
    except ModelFileError as exc:
        raise UsageError(_model_message(path, flag, str(exc))) from None


def _model_message(value, flag: str | None, message: str) -> str:
    """A model error; a bare name that is neither bundled nor a file is most likely a mistyped bundled name."""
    from fkp_core.weights import BUNDLED_MODELS

    text = str(value) if value is not None else ""
    if text and os.sep not in text and "/" not in text and not Path(text).suffix and text not in BUNDLED_MODELS \
            and not Path(text).with_suffix(".pt").exists():
        message = f"no bundled model named {text!r} and no model file {text}.pt (bundled: {', '.join(BUNDLED_MODELS)})"
    return f"{flag}: {message}" if flag else message


def check_model_arg(value, flag: str) -> tuple[str, dict]:
    """(model file path, its metadata) for a --model value, checked without loading any weights."""
    from fkp_core.weights import ModelFileError, read_metadata, resolve_model_path

    path = resolve_model_path(value)
    try:
        if not path.with_suffix(".pt").is_file():
            raise ModelFileError(f"{path.with_suffix('.pt')}: model file not found")
        return str(path), read_metadata(path)
    except ModelFileError as exc:
        raise UsageError(_model_message(value, flag, str(exc))) from None


def check_writable_dir(path: str, flag: str) -> None:
    """A local folder that exists and takes new files, or that can be made; creates nothing (checks and removes)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a folder")
        base = p
        while not base.exists():
            base = base.parent
        if not base.is_dir():
            raise UsageError(f"{flag} {path}: {base} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".fkp-write-test-", dir=base))
    except OSError as exc:
        raise UsageError(f"{flag} {path}: not writable ({exc.strerror or exc})") from None


def existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise UsageError(f"{value}: no such directory")
    return p


def add_view_flags(group) -> None:
    """``--no-mirror`` and ``--shifted-view``: how many looks each face gets, the same for every job that predicts faces
    (annotate, evaluate)."""
    group.add_argument("--no-mirror", action="store_true",
                       help="predict each face only on its crop as it is. By default the last crop is also predicted on its "
                            "mirror image and the two are averaged (one more CNN pass per face, less error and jitter), for models "
                            "whose JSON has a \"mirror_offset\" (fitted with jobs.evaluate --fit-mirror; the bundled ones do)")
    group.add_argument("--shifted-view", action="store_true",
                       help="also predict each face's last crop with its content moved half a heatmap cell, and average: a look "
                            "whose pixel grid falls differently on the face, for less error at two more CNN passes per face "
                            "(one with --no-mirror); see the README's Accuracy and Speed")


def add_detector_flags(group) -> None:
    """The face-detection flags, the same for every job that detects (annotate, evaluate, bench)."""
    from fkp_core.detector import DEFAULT_DETECTOR, DETECTORS, YUNET_SCORE

    group.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                       help="yunet: a CNN face detector (finds turned, dim and small faces; gives eye points, so crops are "
                            "turned upright); fast: the seeds' Haar frontal cascade; recall: Haar frontal + profile cascades")
    group.add_argument("--min-face", type=positive_int, default=64,
                       help="smallest face that must still be found, in pixels of the full frame (its crop-box side); sets the "
                            "scale detection runs at; in frames smaller than 8x this, an eighth of the shorter side. Lower it "
                            "for crowds and small faces (detection gets slower)")
    group.add_argument("--detect-scale", type=share, default=None,
                       help="detect on the frame scaled by this factor (default: follows --min-face and the frame size)")
    group.add_argument("--score-threshold", type=unit_interval, default=YUNET_SCORE,
                       help="yunet: lowest detector score kept (chosen on the development data: README, Detection)")
    group.add_argument("--scale-factor", type=Ranged(float, 1, low_open=True), default=1.2,
                       help="Haar image-pyramid step: larger is faster and finds fewer faces (OpenCV's default 1.1 is slower)")


def detector_spec(args: argparse.Namespace):
    """The :class:`fkp_core.detector.DetectorSpec` of parsed detector flags."""
    from fkp_core.detector import DetectorSpec

    return DetectorSpec(name=args.detector, min_face=args.min_face, detect_scale=args.detect_scale,
                        score_threshold=args.score_threshold, scale_factor=args.scale_factor)


class OutputLock:
    """``OUT/_lock.json``: one run at a time per output folder. It names its owner (host, PID, the PID's start
    time, the command); a lock whose owner is gone (killed, crashed) is taken over, so none is left stuck.

    On a local folder taking the lock is atomic (O_EXCL); on object stores it is a best effort (check, then write).
    """

    NAME = "_lock.json"

    def __init__(self, out, command: str = ""):
        self.out, self.command, self.held = out, command, False
        self.path = out.path(self.NAME)

    @staticmethod
    def _started(pid: int) -> int | None:
        """The PID's start time (clock ticks since boot, Linux), to tell a reused PID from the owner; None: unknown."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return int(f.read().rsplit(b")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            return None

    @classmethod
    def _alive(cls, owner: dict) -> bool:
        import socket

        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: cannot tell, so it counts as running
        pid = int(owner.get("pid", 0))
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return False  # exited, not yet reaped by its parent
        except (OSError, IndexError):
            pass
        started = cls._started(pid)
        return started is None or owner.get("pid_started") is None or started == owner["pid_started"]

    def _owner(self) -> dict:
        import socket
        from datetime import datetime, timezone

        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": self._started(os.getpid()),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": self.command}

    def _try_create(self) -> bool:
        import json

        data = json.dumps(self._owner(), sort_keys=True).encode()
        if not self.out.is_local:
            if self.out.exists(self.path):
                return False
            self.out.write_bytes(self.path, data)
            return True
        self.out.makedirs(self.out.root)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)  # atomic, complete, and fails when the lock exists
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def acquire(self) -> "OutputLock":
        """Take the lock or raise UsageError naming the run that holds it."""
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            try:
                owner = self.out.read_json(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError):
                owner = {"pid": 0}  # not a lock we wrote (written whole or not at all): nobody's
            if owner and self._alive(owner):
                raise UsageError(
                    f"{self.out.uri} is in use by another run (PID {owner.get('pid')} on {owner.get('host')} since "
                    f"{owner.get('since')}); wait for it to end, or delete {self.path} if that run is gone")
            if owner:
                log.info("taking over the lock of a run that is gone (PID %s on %s)", owner.get("pid"), owner.get("host"))
                try:
                    self.out.fs.delete_file(self.path)
                except OSError:
                    pass
        raise UsageError(f"{self.out.uri}: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self.out.read_json(self.path).get("pid") == os.getpid():
                    self.out.fs.delete_file(self.path)
            except (OSError, ValueError):
                pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
