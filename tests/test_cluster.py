"""cluster/: the launcher, KubeRay and runtime-env configs agree with the code, and both jobs run on
a real multi-node Ray cluster (a head and a worker node as separate processes on this machine).

The static checks need no Ray. The cluster tests start their own cluster with cluster/local-up.sh
on free, pinned ports and a temp dir of their own, submit through cluster/submit-*.sh, and stop
exactly their processes with cluster/local-down.sh. They never use ``address="auto"``, never set
RAY_ADDRESS in this process, and leave the suite's embedded Ray (``ray_session``) alone.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCRIPTS = ["local-up.sh", "local-down.sh", "submit.sh", "submit-train.sh", "submit-annotate.sh"]
JOB_MODULES = ("jobs.train", "jobs.annotate")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(KUBERAY.glob("*.yaml"))
    assert files, "no YAML under cluster/"
    return files


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's own and each RayJob's rayClusterSpec."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in _kuberay_objects("RayCluster")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for p, d in _kuberay_objects("RayJob")]
    return specs


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e.get("value")) for e in container.get("env", [])}


def _job_parser(module: str):
    return importlib.import_module(module).build_parser()


def _parse_job_args(module: str, argv: list[str], where: str) -> None:
    """Fail unless ``python -m MODULE ARGV`` would get past its argument parser."""
    parser = _job_parser(module)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `python -m {module} {shlex.join(argv)}` is refused by its parser (exit {exc.code}): {err.getvalue().strip()}")


SHELL_STOP = {"&&", "||", ";", "|", "&"}


def _jobs_in_command(command: str) -> list[tuple[str, list[str]]]:
    """The ``python -m jobs.X ARGS`` calls in a shell command line (also via cluster/submit-X.sh)."""
    words = shlex.split(command, comments=True)
    found = []
    for i, w in enumerate(words):
        module, rest = None, None
        if w in ("python", "python3") and words[i + 1:i + 2] == ["-m"] and words[i + 2:i + 3] and words[i + 2].startswith("jobs."):
            module, rest = words[i + 2], words[i + 3:]
        elif m := re.search(r"submit-(train|annotate)\.sh$", w):
            module, rest = f"jobs.{m.group(1)}", words[i + 1:]
            # skip the wrapper's own options (see cluster/submit.sh)
            while rest and rest[0] in ("-a", "--address", "-e", "--runtime-env", "--submission-id", "--no-wait", "--"):
                opt = rest.pop(0)
                if opt == "--":
                    break
                if opt != "--no-wait":
                    rest.pop(0)
        if module:
            end = next((k for k, x in enumerate(rest) if x in SHELL_STOP), len(rest))
            found.append((module, rest[:end]))
    return found


def _readme_commands() -> list[str]:
    """Shell lines of README.md's shell code blocks (bash, sh, shell), backslash continuations joined."""
    commands, block, lang = [], None, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                if lang in ("bash", "sh", "shell"):
                    text = re.sub(r"\\\n\s*", " ", "\n".join(block))
                    commands += [c.strip() for c in text.splitlines() if c.strip() and not c.strip().startswith("#")]
                block = None
        elif block is not None:
            block.append(line)
    return commands


# ------------------------------------------------------------------------------------------
# static checks (no Ray cluster)
# ------------------------------------------------------------------------------------------


def test_every_yaml_parses_and_the_expected_files_exist():
    for name in ["aws.yaml", "runtime_env.yaml", "runtime_env.local.yaml", "Dockerfile", *SCRIPTS]:
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"
    for path in _yaml_files():
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    kinds = sorted(d["kind"] for p in KUBERAY.glob("*.yaml") for d in _docs(p))
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2, kinds


def test_aws_launcher_config_is_valid_for_the_installed_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    # what `ray up` does before anything else: fill in the provider's defaults, check the schema
    config = prepare_config(json.loads(json.dumps(raw)))
    validate_config(config)

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    gpu_types = {k: t for k, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0 and t.get("max_workers", 0) >= 1, f"{name}: autoscale from 0"
        assert re.match(r"(g5|g6|g6e|p4d|p5)\.", t["node_config"]["InstanceType"]), t["node_config"]["InstanceType"]
    # the project reaches every node and is installed there, torch before it
    assert raw["file_mounts"].get("~/fkp") == "."
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ; ".join(raw[key])
        assert "pip install" in cmds and "~/fkp" in cmds, f"{key} does not install the project"
        assert cmds.index("torch") < cmds.index("~/fkp"), f"{key}: install torch before the project"
    assert "download.pytorch.org/whl/cpu" in " ".join(raw["head_setup_commands"]), "CPU torch on the CPU head"
    assert "whl/cpu" not in " ".join(raw["worker_setup_commands"]), "GPU workers need the CUDA build of torch"
    for excluded in (".venv", "runs", "data"):
        assert excluded in raw["rsync_exclude"], f"rsync_exclude lacks {excluded}"


def test_kuberay_cluster_and_jobs_are_complete():
    (path, rc), = _kuberay_objects("RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "keep tasks off the head pod"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}

    def gpus(group):
        (container,) = group["template"]["spec"]["containers"]
        res = container["resources"]
        return int(res.get("limits", {}).get("nvidia.com/gpu", 0)), int(res.get("requests", {}).get("nvidia.com/gpu", 0))

    gpu_groups = [g for g in groups.values() if gpus(g)[0] > 0]
    cpu_groups = [g for g in groups.values() if gpus(g)[0] == 0]
    assert len(gpu_groups) == 1 and cpu_groups, f"{path}: want one GPU group and a CPU group, got {list(groups)}"
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    (g,) = gpu_groups
    assert gpus(g) == (1, 1), "the GPU group requests nvidia.com/gpu: 1"
    assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, "the GPU group autoscales from 0"

    jobs = {d["metadata"]["name"]: d["spec"] for _, d in _kuberay_objects("RayJob")}
    modules = set()
    for name, job in jobs.items():
        assert job["shutdownAfterJobFinishes"] is True, name
        assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0, name
        env = yaml.safe_load(job["runtimeEnvYAML"])
        assert isinstance(env, dict) and "env_vars" in env, f"{name}: runtimeEnvYAML"
        calls = _jobs_in_command(job["entrypoint"])
        assert len(calls) == 1, f"{name}: entrypoint must be one `python -m jobs.*` call: {job['entrypoint']}"
        modules.add(calls[0][0])
        cluster = job["rayClusterSpec"]
        for group in cluster.get("workerGroupSpecs", []):
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}/{group['groupName']}"
    assert modules == set(JOB_MODULES)


def _image_tag_parts(image: str) -> tuple[str, str]:
    """(ray version, python tag) named by an image: rayproject/ray:2.60.0-py311-gpu, fkp:...-ray2.60.0-py311-gpu."""
    m = re.search(r"(?:^|[:-]ray|:)(\d+\.\d+\.\d+)-(py\d+)", image.split("/")[-1])
    assert m, f"cannot read the Ray version and Python tag from image {image!r}"
    return m.group(1), m.group(2)


def test_ray_version_and_images_agree_everywhere():
    import ray

    version = ray.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from packaging.requirements import Requirement

    ray_req = next(Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray")
    assert ray_req.specifier.contains(version), f"installed ray {version} is outside pyproject's {ray_req}"

    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    aws_image = aws["docker"]["image"]
    assert _image_tag_parts(aws_image)[0] == version, f"aws.yaml image {aws_image} is not Ray {version}"
    for node_type in aws["available_node_types"].values():
        override = node_type.get("docker", {}).get("worker_image")
        assert override in (None, aws_image), f"a node type overrides the image: {override}"
    aws_pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", " ".join(aws["head_setup_commands"] + aws["worker_setup_commands"]))
    assert aws_pins and set(aws_pins) == {version}, f"aws.yaml pins ray {aws_pins}, installed {version}"

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, flags=re.M).group(1)
    assert base == aws_image, f"cluster/Dockerfile builds on {base}, aws.yaml runs {aws_image}"
    assert set(re.findall(r"ray\[[^\]]*\]==([\d.]+)", dockerfile)) == {version}

    images, where = set(), []
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == version, f"{name}: rayVersion {spec['rayVersion']} != installed {version}"
        for group, pod in _pod_specs(spec):
            for c in pod["containers"]:
                images.add(c["image"])
                where.append(f"{name}/{group}: {c['image']}")
    assert len(images) == 1, "KubeRay manifests use different images:\n" + "\n".join(where)
    (image,) = images
    assert _image_tag_parts(image) == _image_tag_parts(aws_image), f"{image} vs {aws_image}"
    assert image in dockerfile, "cluster/Dockerfile should name the image the manifests run"


def test_auth_mode_agrees_between_clusters_and_runtime_envs():
    expected = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]["RAY_AUTH_MODE"]
    seen = {"runtime_env.local.yaml": yaml.safe_load((CLUSTER / "runtime_env.local.yaml").read_text())["env_vars"]["RAY_AUTH_MODE"]}
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    opts = " ".join(aws["docker"]["run_options"])
    m = re.search(r"--env RAY_AUTH_MODE=(\w+)", opts)
    seen["aws.yaml docker run_options"] = m.group(1) if m else None
    for name, spec in _cluster_specs():
        for group, pod in _pod_specs(spec):
            for c in pod["containers"]:
                seen[f"{name}/{group}"] = _container_env(c).get("RAY_AUTH_MODE")
    for p, d in _kuberay_objects("RayJob"):
        seen[f"{p.name} runtimeEnvYAML"] = yaml.safe_load(d["spec"]["runtimeEnvYAML"])["env_vars"].get("RAY_AUTH_MODE")
    m = re.search(r"RAY_AUTH_MODE=(\w+)", (CLUSTER / "Dockerfile").read_text())
    seen["Dockerfile ENV"] = m.group(1) if m else None
    wrong = {k: v for k, v in seen.items() if v != expected}
    assert not wrong, f"RAY_AUTH_MODE differs from runtime_env.yaml's {expected!r}: {wrong}"


def test_runtime_env_matches_pyproject():
    from packaging.requirements import Requirement

    def normal(reqs):
        out = {}
        for r in map(Requirement, reqs):
            out[r.name.lower().replace("_", "-")] = (sorted(r.extras), str(r.specifier), str(r.marker or ""))
        return out

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert normal(pip) == normal(pyproject["project"]["dependencies"])

    for name in ("runtime_env.yaml", "runtime_env.local.yaml"):
        env = yaml.safe_load((CLUSTER / name).read_text())
        assert env["working_dir"] == ".", name
        excludes = " ".join(env["excludes"])
        for big in (".venv", "runs", "data", ".git"):
            assert re.search(rf"(^| ){re.escape(big)}/?( |$)", excludes), f"{name}: excludes lack {big}/"
        assert env["env_vars"].get("RAY_AUTH_MODE"), name
    assert "pip" not in yaml.safe_load((CLUSTER / "runtime_env.local.yaml").read_text()), (
        "the local runtime env must not build a pip env (nodes already run the project's venv)"
    )


def test_entrypoints_name_existing_jobs_and_accepted_flags():
    sources: list[tuple[str, str]] = []
    for p, d in _kuberay_objects("RayJob"):
        sources.append((f"{p.name}", d["spec"]["entrypoint"]))
    sources += [("README.md", c) for c in _readme_commands()]
    calls = [(where, module, argv) for where, cmd in sources for module, argv in _jobs_in_command(cmd)]
    kuberay_modules = {m for w, m, _ in calls if not w.endswith("README.md")}
    assert kuberay_modules == set(JOB_MODULES), f"expected RayJobs for both jobs, got {calls}"
    submitted = {m for w, m, a in calls if w.endswith("README.md") and ("--storage" in a or "/shared/videos" in a)}
    assert submitted == set(JOB_MODULES), "README.md should show how to submit both jobs to a cluster"
    for where, module, argv in calls:  # every `python -m jobs.X ...` shown anywhere must get past its parser
        _parse_job_args(module, argv, where)


def test_scripts_are_strict_executable_and_documented():
    for name in SCRIPTS:
        path = CLUSTER / name
        text = path.read_text()
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "set -euo pipefail" in text, name
        subprocess.run(["bash", "-n", str(path)], check=True)
        code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not any(re.search(r"(^|[;&|(]\s*|\s)ray stop\b", ln) and "never" not in ln.lower() for ln in code), (
            f"{name} calls `ray stop`, which kills every Ray process of the host"
        )
        res = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and "Usage" in res.stdout, f"{name} --help: {res.returncode} {res.stderr}"
    bad = subprocess.run([str(CLUSTER / "local-up.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr
    none = subprocess.run([str(CLUSTER / "local-down.sh"), "--state", "/nonexistent/x.env"], capture_output=True, text=True, timeout=30)
    assert none.returncode == 0 and "nothing to stop" in none.stdout


def test_submit_wrappers_build_the_ray_job_submit_command(tmp_path):
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "cwd=$PWD"\nfor a in "$@"; do echo "arg=$a"; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        [str(CLUSTER / "submit-annotate.sh"), "--address", "http://10.0.0.1:8265", "--no-wait", "--submission-id", "a1",
         "--", "/shared/v 1.mp4", "--out", "s3://b/out"],
        capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"cwd={ROOT}", "the wrapper must run from the project root (working_dir '.')"
    args = [ln[4:] for ln in lines[1:]]
    assert args == ["job", "submit", "--address", "http://10.0.0.1:8265", "--runtime-env", str(CLUSTER / "runtime_env.yaml"),
                    "--no-wait", "--submission-id", "a1", "--", "python", "-m", "jobs.annotate", "/shared/v 1.mp4", "--out", "s3://b/out"]
    res = subprocess.run([str(CLUSTER / "submit-train.sh"), "--epochs", "1"], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 2 and "no cluster address" in res.stderr
    env["RAY_ADDRESS"] = "http://h:8265"
    res = subprocess.run([str(CLUSTER / "submit-train.sh"), "-e", "cluster/runtime_env.local.yaml", "--epochs", "1"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    assert [ln[4:] for ln in res.stdout.splitlines()[1:]][-5:] == ["python", "-m", "jobs.train", "--epochs", "1"]
    assert f"arg={CLUSTER / 'runtime_env.local.yaml'}" in res.stdout


# ------------------------------------------------------------------------------------------
# a real two-node cluster on this machine
# ------------------------------------------------------------------------------------------

JOB_TIMEOUT_S = 240


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_base_port(workers: int) -> int:
    """A base port whose whole block (see local-up.sh --help) is free, below the ephemeral range."""
    rng = random.Random(os.getpid() * 7919 + time.time_ns())
    for _ in range(100):
        base = rng.randrange(20000, 32000 - 100 * (workers + 2), 10)
        ports = [base, base + 1, base + 2] + [base + 10 + i for i in range(workers + 1)]
        ports += list(range(base + 100, base + 100 + 100 * (workers + 1)))
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port block found")


def _subprocess_env() -> dict[str, str]:
    """Our environment minus any Ray setting (e.g. a RAY_ADDRESS meant for something else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", FKP_VENV=sys.prefix, PYTHONUNBUFFERED="1")
    # the scripts call `ray`: the one installed with this interpreter, even from a venv that is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


def _read_state(path: Path) -> dict[str, str]:
    state = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            state[k] = v
    return state


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _processes_of(temp_dir: str, gcs_port: int, sids: set[int]) -> list[str]:
    """Processes still running that belong to the cluster, by session, temp dir or GCS port."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    left = []
    for line in out.splitlines():
        pid, sid, stat, args = (line.split(None, 3) + [""])[:4]
        if stat.startswith("Z") or int(pid) == os.getpid():
            continue
        if int(sid) in sids or temp_dir in args or re.search(rf":{gcs_port}\b", args):
            if "ps -eww" not in args:
                left.append(line.strip())
    return left


class LocalCluster:
    def __init__(self, state_file: Path, state: dict[str, str], env: dict[str, str]):
        self.state_file, self.state, self.env = state_file, state, env
        self.dashboard = state["RAY_ADDRESS"]
        self.temp_dir = state["TEMP_DIR"]
        self.gcs_port = int(state["GCS_PORT"])
        self.sids = {int(s) for s in state["SIDS"].split()}
        self.pids = [int(p) for p in state["PIDS"].split()]

    def nodes(self) -> list[dict]:
        return [n["raylet"] for n in _get_json(f"{self.dashboard}/nodes?view=summary")["data"]["summary"]]

    def submit(self, job: str, submission_id: str, args: list[str]) -> None:
        cmd = [str(CLUSTER / f"submit-{job}.sh"), "--address", self.dashboard, "--runtime-env", "cluster/runtime_env.local.yaml",
               "--no-wait", "--submission-id", submission_id, "--", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120, cwd=ROOT)
        assert res.returncode == 0, f"submit failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    def wait(self, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = client.get_job_status(submission_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(1.0)
        logs = client.get_job_logs(submission_id)
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {timeout:.0f}s; log tail:\n{logs[-4000:]}")
        return str(status), logs

    def list_state(self, what: str, **filters: str) -> list[dict]:
        query = "&".join(
            f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items()
        )
        data = _get_json(f"{self.dashboard}/api/v0/{what}?limit=10000&detail=true&{query}")
        return data["data"]["result"]["result"]

    def job_id(self, submission_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard).get_job_info(submission_id).job_id


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """Head + 1 worker node, 1 CPU each, as separate `ray start` processes (cluster/local-up.sh)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # for this process's job client (init_ray does the same)
    logs = tmp_path_factory.mktemp("cluster-logs")
    # Not under tmp_path: Ray puts unix sockets in the temp dir, and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="fkpc-", dir="/tmp")
    state_file = Path(temp_dir) / "local-cluster.env"
    env = _subprocess_env()
    base = _free_base_port(workers=1)
    started = time.monotonic()
    up = subprocess.run(
        [str(CLUSTER / "local-up.sh"), "--workers", "1", "--cpus", "1", "--base-port", str(base), "--temp-dir", temp_dir,
         "--timeout", "150"],
        capture_output=True, text=True, env=env, timeout=240, cwd=ROOT,
    )
    print(f"local-up.sh: {time.monotonic() - started:.1f}s\n{up.stdout}")
    try:
        assert up.returncode == 0, f"local-up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        cluster = LocalCluster(state_file, _read_state(state_file), env)
        yield cluster
    finally:
        if state_file.exists():  # a test may have stopped it already
            subprocess.run([str(CLUSTER / "local-down.sh"), "--state", str(state_file), "--grace", "8"],
                           capture_output=True, text=True, env=env, timeout=120)
        with contextlib.suppress(OSError):
            shutil.copytree(Path(temp_dir) / "session_latest" / "logs", logs / "ray", ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_local_cluster_has_two_one_cpu_nodes_on_pinned_ports(local_cluster):
    nodes = local_cluster.nodes()
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes), nodes
    assert sorted(n["resourcesTotal"]["CPU"] for n in nodes) == [1.0, 1.0]
    assert all(n["resourcesTotal"].get("GPU", 0) == 0 for n in nodes)
    base = local_cluster.gcs_port
    assert local_cluster.dashboard == f"http://127.0.0.1:{base + 1}"
    assert local_cluster.state["AGENT_PORTS"].split() == [str(base + 10), str(base + 11)]
    assert Path(local_cluster.state["PYTHON"]).parent == Path(sys.prefix) / "bin", "jobs must run with the test's interpreter"
    assert local_cluster.sids and all(_alive(p) for p in local_cluster.pids[:3])


def test_train_job_runs_on_both_nodes_and_writes_a_loadable_model(local_cluster, tmp_path):
    from conftest import make_course_dataset
    from fkp_core.weights import load_model

    data = make_course_dataset(tmp_path / "data", n=24, people=6)
    out, storage = tmp_path / "model", tmp_path / "checkpoints"
    sid = f"fkp-train-{os.getpid()}-{int(time.time())}"
    started = time.monotonic()
    # 2 workers x 1 CPU on two 1-CPU nodes: the only placement puts one worker on each node.
    local_cluster.submit("train", sid, [
        "--data", f"course:{data.resolve()}", "--model", "tiny", "--epochs", "1", "--batch-size", "4",
        # the split is a hash of the identity: 0.5 holds out 1 of these 6 people (0.1-0.34 none,
        # and an empty validation split leaves jobs.train with no best epoch to export)
        "--val-fraction", "0.5", "--num-workers", "2", "--cpus-per-worker", "1",
        "--storage", str(storage.resolve()), "--output", str(out.resolve()), "--name", "cluster-test",
    ])
    status, logs = local_cluster.wait(sid)
    print(f"train job: {status} in {time.monotonic() - started:.1f}s")
    assert status == "SUCCEEDED", f"train job {status}; log tail:\n{logs[-6000:]}"
    assert "cluster Ray" in logs, "jobs.train should have joined the cluster (RAY_ADDRESS), not started its own Ray"

    loaded = load_model(out / "cluster-test.pt")
    assert loaded.config.to_dict()["input_size"] > 0
    assert loaded.metadata["trained"]["workers"] == 2
    assert any(storage.joinpath("cluster-test").glob("checkpoint_*")), "no checkpoint under --storage"

    job_id = local_cluster.job_id(sid)
    workers = [a for a in local_cluster.list_state("actors", class_name="RayTrainWorker") if a["job_id"] == job_id]
    assert len(workers) == 2, workers
    node_ids = {n["nodeId"] for n in local_cluster.nodes()}
    assert {a["node_id"] for a in workers} == node_ids, "the two Ray Train workers should have run on different nodes"


def test_annotate_job_runs_on_both_nodes_and_writes_parquet(local_cluster, tmp_path):
    import pyarrow.parquet as pq

    clip = ROOT / "examples" / "sample.mp4"  # 320 frames of real faces; the bundled model
    out = tmp_path / "annotations"
    sid = f"fkp-annotate-{os.getpid()}-{int(time.time())}"
    started = time.monotonic()
    # 320 frames in segments of 40, 1 CPU each, on two 1-CPU nodes: segments run on both nodes.
    local_cluster.submit("annotate", sid, [
        str(clip), "--out", str(out.resolve()), "--device", "cpu", "--segment-frames", "40", "--cpus-per-segment", "1", "-q",
    ])
    status, logs = local_cluster.wait(sid)
    print(f"annotate job: {status} in {time.monotonic() - started:.1f}s")
    assert status == "SUCCEEDED", f"annotate job {status}; log tail:\n{logs[-6000:]}"

    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 1, sorted(p.name for p in out.iterdir())
    faces = pq.read_table(parts[0])
    assert faces.num_rows >= 300, f"expected a face in (nearly) every one of the 320 frames, got {faces.num_rows} rows"
    videos = pq.read_table(out / "_videos.parquet").to_pylist()
    assert len(videos) == 1 and videos[0]["status"] == "ok", videos

    job_id = local_cluster.job_id(sid)
    tasks = [t for t in local_cluster.list_state("tasks", job_id=job_id) if "segment" in t["name"]]
    assert len({t["node_id"] for t in tasks if t.get("node_id")}) == 2, (
        "segment tasks should have run on both nodes: " + ", ".join(f"{t['name']}@{str(t.get('node_id'))[:8]}" for t in tasks)
    )


def test_local_down_stops_exactly_the_cluster(local_cluster, tmp_path):
    # A bystander that names the cluster's temp dir and looks Ray-ish must survive.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{local_cluster.temp_dir}/raylet.out", "ray"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # A job still running: its driver lives in a session of its own (Ray's start_new_session).
    from ray.job_submission import JobStatus, JobSubmissionClient

    marker = f"fkp-sleeper-{os.getpid()}-{int(time.time())}"
    client = JobSubmissionClient(local_cluster.dashboard)
    client.submit_job(entrypoint=f"python -c 'import time; time.sleep(300)' {marker}", submission_id=marker)
    deadline = time.monotonic() + 60
    while client.get_job_status(marker) != JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(marker) == JobStatus.RUNNING

    def sleepers() -> list[str]:
        ps = subprocess.run(["ps", "-eww", "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
        return [ln for ln in ps.splitlines() if marker in ln and "ps -eww" not in ln and ln.split()[1][0] != "Z"]

    try:
        assert sleepers(), "the running job's driver process was not found"
        assert _processes_of(local_cluster.temp_dir, local_cluster.gcs_port, local_cluster.sids), "cluster not running?"
        started = time.monotonic()
        res = subprocess.run([str(CLUSTER / "local-down.sh"), "--state", str(local_cluster.state_file), "--grace", "8"],
                             capture_output=True, text=True, env=local_cluster.env, timeout=120)
        print(f"local-down.sh: {time.monotonic() - started:.1f}s: {res.stdout.strip()}")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        left = _processes_of(local_cluster.temp_dir, local_cluster.gcs_port, local_cluster.sids)
        left = [ln for ln in left if not ln.startswith(f"{bystander.pid} ")]
        assert not left, "still running after local-down.sh:\n" + "\n".join(left)
        assert not sleepers(), "the running job's driver survived local-down.sh"
        assert not [p for p in local_cluster.pids if _alive(p)], "a PID recorded by local-up.sh is still alive"
        assert bystander.poll() is None, "local-down.sh killed a process that is not part of the cluster"
        assert not local_cluster.state_file.exists()
        with pytest.raises(OSError):
            _get_json(f"{local_cluster.dashboard}/api/version")
        # idempotent
        again = subprocess.run([str(CLUSTER / "local-down.sh"), "--state", str(local_cluster.state_file)],
                               capture_output=True, text=True, env=local_cluster.env, timeout=60)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
        # the suite's embedded Ray, if this session started it, is untouched
        import ray

        if ray.is_initialized():
            assert ray.get(ray.put(41)) + 1 == 42
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()
