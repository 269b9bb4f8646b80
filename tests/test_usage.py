"""Usage errors of every job: numeric flags range-checked at parse time (the flag list comes from the parsers,
so a new flag is covered the day it is added), requests the cluster can never satisfy, and a job that answers
before it starts Ray or loads a model, creating nothing."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import jobs
from conftest import PROJECT_ROOT
from jobs.common import Ranged

SAMPLE = PROJECT_ROOT / "examples" / "sample.mp4"


def _parsers() -> list[tuple[str, argparse.ArgumentParser, list[str], argparse.ArgumentParser]]:
    """(name, parser, argv prefix, the job's parser) for every job's parser and every sub-command of one."""
    found = []
    for info in pkgutil.iter_modules(jobs.__path__):
        module = importlib.import_module(f"jobs.{info.name}")
        if not hasattr(module, "build_parser"):
            continue
        root = module.build_parser()
        stack = [(info.name, root, [])]
        while stack:
            name, parser, prefix = stack.pop()
            found.append((name, parser, prefix, root))
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend((f"{name} {sub}", p, prefix + [sub]) for sub, p in action.choices.items())
    return found


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the positional arguments and required options, so that only the flag under test is wrong."""
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        value = str(next(iter(action.choices))) if action.choices else "x"
        if not action.option_strings:
            argv.append(value)
        elif action.required:
            argv += [action.option_strings[-1], value]
    return argv


def _numeric_flags():
    cases = []
    for name, parser, prefix, root in _parsers():
        for action in parser._actions:
            if action.type in (int, float) or isinstance(action.type, Ranged):
                cases.append(pytest.param(parser, prefix, root, action, id=f"{name} {action.option_strings[-1]}"))
    return cases


NUMERIC_FLAGS = _numeric_flags()


def test_the_flag_list_comes_from_the_parsers():
    names = {p.id for p in NUMERIC_FLAGS}
    # a few that must be there (the full list is whatever the parsers hold)
    assert {"annotate --cpus-per-segment", "annotate --num-cpus", "annotate --max-retries", "train --epochs",
            "evaluate --threshold", "bench model --threads"} <= names
    assert len(names) >= 30


@pytest.mark.parametrize("parser, prefix, root, action", NUMERIC_FLAGS)
def test_numeric_flag_range_checked_at_parse_time(parser, prefix, root, action, capsys):
    """The range is the type's (jobs.common.Ranged), or a flag's list of choices; --help states it either way."""
    flag = action.option_strings[-1]
    help_text = " ".join(parser.format_help().split())
    if action.choices is not None:  # e.g. type=int, choices=[0, 2, 4, 8]: argparse checks and lists them
        kind, accepts, text = action.type, (lambda v: v in action.choices), None
        assert "{" + ",".join(map(str, action.choices)) + "}" in help_text, f"{flag}: --help does not list the choices"
    else:
        assert isinstance(action.type, Ranged), f"{flag}: type={action.type.__name__} has no range: use a jobs.common range type"
        kind, accepts, text = action.type.kind, action.type.accepts, action.type.text
        assert " ".join(text.split()) in help_text, f"{flag}: --help does not state the range"
    base = prefix + _required(parser)
    for value in ("0", "-5", "abc", "nan"):
        try:
            number = kind(value)
        except ValueError:
            number = None
        valid = number is not None and accepts(number)
        argv = base + [f"{flag}={value}"]
        if valid:
            args = root.parse_args(argv)
            assert getattr(args, action.dest) == number
            continue
        with pytest.raises(SystemExit) as exc:
            root.parse_args(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, err
        if text is not None:
            assert text in err and ("out of range" if number is not None else "invalid") in err, err


def test_ranges_are_what_they_say():
    from jobs.common import fraction, non_negative_int, positive_float, positive_int, share, unit_interval

    assert positive_int.accepts(1) and not positive_int.accepts(0)
    assert non_negative_int.accepts(0) and not non_negative_int.accepts(-1)
    assert positive_float.accepts(1e-9) and not positive_float.accepts(0.0) and not positive_float.accepts(float("inf"))
    assert unit_interval.accepts(0.0) and unit_interval.accepts(1.0) and not unit_interval.accepts(1.01)
    assert not fraction.accepts(0.0) and not fraction.accepts(1.0) and fraction.accepts(0.5)
    assert not share.accepts(0.0) and share.accepts(1.0)
    assert positive_int.text == "an integer >= 1" and share.text == "a number in (0, 1]"


def _annotate(argv, capsys) -> tuple[int, str]:
    from jobs import annotate

    try:
        code = annotate.main([str(a) for a in argv] + ["-q"])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def _no_ray(monkeypatch):
    """Make starting Ray (or loading weights) in this process a test failure."""
    from jobs import annotate

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(annotate, "init_ray", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--cpus-per-segment", "3", "--num-cpus", "2"], "--cpus-per-segment 3: the local Ray instance (--num-cpus 2) has 2 CPU(s)"),
    (["--cpus-per-segment", "100000"], "--cpus-per-segment 100000: this machine has"),
    (["--model", "fastestt"], "no bundled model named 'fastestt'"),
    (["--filter", "hat"], "unknown filter 'hat'"),
    (["--render", "/proc/fkp_render"], "--render /proc/fkp_render: not writable"),
    (["--device", "cuda"], "--device cuda, but this machine has no GPU"),
])
def test_usage_errors_answer_before_ray_and_create_nothing(tmp_path, capsys, monkeypatch, flags, message):
    if "cuda" in flags:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    _no_ray(monkeypatch)
    render = [] if "--render" in flags else ["--render", tmp_path / "r"]
    code, err = _annotate([SAMPLE, "--out", tmp_path / "o" / "deeper", *render, *flags], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == [], "a usage error left files or folders behind"


def test_a_bundled_name_typo_lists_the_bundled_models(capsys, monkeypatch, tmp_path):
    _no_ray(monkeypatch)
    code, err = _annotate([SAMPLE, "--out", tmp_path / "o", "--model", "fastestt"], capsys)
    assert code == 2 and "bundled: default, hm, fast, fastest" in err


def test_usage_error_in_a_fresh_process_takes_no_ray_start(tmp_path):
    """The way a user meets it: a new process, a bad input. It answers without starting Ray (no ray processes,
    no temp dir), whatever the machine's speed: what is asserted is that Ray's session folder is not made."""
    ray_tmp = tmp_path / "ray"
    env = {"FKP_RAY_TEMP_DIR": str(ray_tmp), "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "jobs.annotate", str(SAMPLE), "--out", str(tmp_path / "o"),
                           "--render", str(tmp_path / "r"), "--filter", "hat"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "unknown filter 'hat'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.timeout(180)
def test_cpus_per_segment_no_node_has_is_refused_after_ray_starts(tmp_path, capsys, monkeypatch, ray_session):
    """Past the check before Ray (a machine that seems bigger than the Ray instance): refused, not waited on forever."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    code, err = _annotate([SAMPLE, "--out", tmp_path / "o", "--cpus-per-segment", "3"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--cpus-per-segment 3: the largest node of the Ray cluster has 2 CPU(s)" in err, err
    assert list(tmp_path.iterdir()) == []  # found after Ray started: still no --out left behind


def test_cluster_tests_use_the_running_interpreters_ray(monkeypatch):
    """The suite run from a venv that is not activated (its bin not on PATH) still finds that venv's `ray`."""
    import os
    import shutil

    from test_cluster import _subprocess_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    ray = shutil.which("ray", path=_subprocess_env()["PATH"])
    assert ray is not None and Path(ray).parent == Path(sys.executable).parent, ray
    assert os.environ["PATH"] == "/usr/bin:/bin"


# ---- smaller ones ------------------------------------------------------------------------------------


def test_model_files_get_the_users_umask(tmp_path):
    import os

    from fkp_core.model import KeypointNet, ModelConfig
    from fkp_core.weights import save_model

    old = os.umask(0o022)
    try:
        pt = save_model(KeypointNet(ModelConfig.from_dict({**ModelConfig().to_dict(), "input_size": 32})), tmp_path / "m")
        os.umask(0o027)
        pt2 = save_model(KeypointNet(ModelConfig.from_dict({**ModelConfig().to_dict(), "input_size": 32})), tmp_path / "n")
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (pt, pt.with_suffix(".json"))] == ["0o644", "0o644"]
    assert oct(pt2.stat().st_mode & 0o777) == "0o640"


def test_another_ray_instance_on_the_machine_is_left_alone(tmp_path):
    """`ray start` leaves its address in the temp dir; Ray's own init would join it (and refuse --num-cpus with a
    traceback, or hang on a dead one). The jobs start an instance of their own instead (jobs.train and
    jobs.annotate both start Ray through init_ray)."""
    import os
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="fkp-t-", dir="/tmp")  # short: unix socket paths are limited
    try:
        Path(temp_dir, "ray_current_cluster").write_text("127.0.0.1:1\n")  # a cluster `ray start` began (now gone)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "FKP_RAY_TEMP_DIR": temp_dir,
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        code = "from jobs.common import init_ray; import ray; print(init_ray(num_cpus=1), int(ray.cluster_resources()['CPU']))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and proc.stdout.split() == ["local", "1"], proc.stderr[-2000:]
    finally:
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_readmes_annotate_outputs_are_git_ignored():
    """Running the README's examples in the project folder leaves nothing for `git status` to show."""
    import re
    import shutil

    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outs = set()
    for line in (PROJECT_ROOT / "README.md").read_text().splitlines():
        if "jobs.annotate" in line:
            outs |= {m for m in re.findall(r"--(?:out|render) ([\w./-]+)(?=[\s`),]|$)", line) if not m.isupper() and "://" not in m}
    assert "landmarks.parquet" in outs
    for name in sorted(outs):
        probe = f"{name.rstrip('/')}/part-x.parquet"
        res = subprocess.run(["git", "check-ignore", "-q", probe], cwd=PROJECT_ROOT)
        assert res.returncode == 0, f"{probe} (README example output) is not in .gitignore"


def test_ci_installs_torch_with_a_command_the_readme_states():
    """The README's CPU-only path is what CI runs (CI cannot reach the CPU index, so it runs the README's form for a
    pip that finds the CPU wheel itself), and the README's test command is CI's last line."""
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    readme = (PROJECT_ROOT / "README.md").read_text()
    torch_lines = [line.strip() for line in ci if "install" in line and "torch" in line and not line.lstrip().startswith("#")]
    assert torch_lines, "no torch install in .ci/run"
    for line in torch_lines:
        assert f"`{line}`" in readme or f"\n{line}\n" in readme, f".ci/run runs {line!r}, which the README does not state"
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert [line for line in ci if line.strip()][-1] in readme
