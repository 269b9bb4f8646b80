"""fkp_core is a plain library: importing any of it pulls in neither Ray nor the jobs package."""

import pkgutil
import subprocess
import sys

import fkp_core
from conftest import PROJECT_ROOT


def test_no_module_of_fkp_core_imports_ray_or_jobs():
    modules = sorted(m.name for m in pkgutil.iter_modules(fkp_core.__path__))
    assert {"dataset", "transforms", "model", "detector", "landmarks", "video", "tables", "filters"} <= set(modules)
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module('fkp_core.' + m)\n"
        "bad = sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.') or n == 'jobs' or n.startswith('jobs.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


def test_importing_the_package_is_cheap():
    code = "import sys, fkp_core; heavy = [m for m in ('torch', 'cv2', 'ray', 'av') if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=60)


def test_entry_points_import_without_side_effects():
    code = (
        "import sys\n"
        "for m in ('annotate', 'train', 'evaluate', 'bench', 'make_sample', 'make_docs'):\n"
        "    mod = __import__('jobs.' + m, fromlist=['main'])\n"
        "    assert callable(mod.main) and callable(mod.build_parser)\n"
        "assert 'ray' not in sys.modules, 'importing an entry point started Ray imports'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)


def _all_actions(parser):
    """The parser's flags, subcommands' flags included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield action


def test_every_flag_of_every_job_is_explained():
    import importlib

    for name in ("annotate", "train", "evaluate", "bench", "make_sample", "make_docs"):
        parser = importlib.import_module(f"jobs.{name}").build_parser()
        unexplained = [a.dest for a in _all_actions(parser) if not (a.help or "").strip()]
        assert not unexplained, f"jobs.{name}: flags without help: {unexplained}"
        assert "(default: None)" not in parser.format_help()  # a flag left out says what happens instead
