"""What every entry point shares: one-line usage errors (exit 2), logging, and starting or joining Ray."""

from __future__ import annotations

import argparse
import logging
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags' help says what happens when they are left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


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
        ray.init(address=address, **kwargs)
        return "cluster"
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    temp_dir = os.environ.get("FKP_RAY_TEMP_DIR") or os.path.join(tempfile.gettempdir(), f"fkp-ray-{os.getuid()}")
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]},
                     "worker_process_setup_hook": "jobs.common.quiet_worker_logs"},
        **kwargs,
    )
    return "local"


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
        raise UsageError(f"{flag}: {exc}" if flag else str(exc)) from None


def existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise UsageError(f"{value}: no such directory")
    return p
