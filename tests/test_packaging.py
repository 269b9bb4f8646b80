"""What `pip install .` (not only `pip install -e .`) puts on disk: the bundled models, detector included."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import PROJECT_ROOT


@pytest.mark.slow
def test_the_wheel_carries_every_bundled_model_file(tmp_path):
    from fkp_core.detector import YUNET_MODEL

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(PROJECT_ROOT)],
                           capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "No matching distribution" in built.stderr + built.stdout:
        pytest.skip("no build backend reachable to build a wheel")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("fkp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = YUNET_MODEL.parent.parent
    for path in sorted(assets.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            assert f"fkp_core/{path.relative_to(assets.parent).as_posix()}" in names, path
    assert "fkp_core/assets/yunet/LICENSE" in names and "fkp_core/assets/yunet/yunet_n_640_640.onnx" in names
    # every module of the library, those of its sub-packages included (setuptools lists packages one by one)
    for module in sorted((PROJECT_ROOT / "fkp_core").rglob("*.py")):
        assert module.relative_to(PROJECT_ROOT).as_posix() in names, module
