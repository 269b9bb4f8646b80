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
