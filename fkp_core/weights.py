"""Release weights: a state_dict (``NAME.pt``) plus JSON metadata (``NAME.json``), loaded safely.

The ``.pt`` file holds tensors only and is read with ``torch.load(weights_only=True)``, so a
file that smuggles arbitrary objects is refused rather than executed. The JSON records the
architecture, the input the model expects, how it was trained and what it scored, and the
SHA-256 of the ``.pt`` file, so that a swapped or damaged weights file is caught before use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fkp_core.fitted import ModelFit
from fkp_core.model import KeypointNet, ModelConfig

FORMAT = "fkp-keypoints/1"
DEFAULT_MODEL_NAME = "fkp_default"
# models shipped inside the package, by the name a --model flag takes: the default (MobileNetV2 from ImageNet,
# with learned keypoint scores), the former default (hm, trained from scratch) and two smaller networks distilled
# from the default for the video fast path (README: Accuracy and Speed)
BUNDLED_MODELS = {"default": DEFAULT_MODEL_NAME, "hm": "fkp_hm", "fast": "fkp_fast", "fastest": "fkp_fastest"}


class ModelFileError(RuntimeError):
    """A model file that cannot be used: missing, corrupt, tampered with, or for another network."""


@dataclass
class LoadedModel:
    model: KeypointNet
    config: ModelConfig
    metadata: dict[str, Any]
    path: Path

    @property
    def fit(self) -> ModelFit:
        """What was fitted to this model after training (its JSON): face-confidence weights, mirrored-pass offset."""
        return ModelFit.from_metadata(self.metadata)


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def default_model_path() -> Path:
    """The model shipped inside the package (the default of every job)."""
    return bundled_model_path("default")


def bundled_model_path(name: str) -> Path:
    """One of the models shipped inside the package, by its ``BUNDLED_MODELS`` name."""
    if name not in BUNDLED_MODELS:
        raise ModelFileError(f"no bundled model named {name!r} (bundled: {', '.join(BUNDLED_MODELS)})")
    return Path(str(resources.files("fkp_core") / "assets" / f"{BUNDLED_MODELS[name]}.pt"))


def resolve_model_path(value: str | os.PathLike | None) -> Path:
    """What a ``--model`` value names: a bundled model by name (None: the default), else a file path.

    The names win over files of the same name in the working directory (write ``./fast`` for those).
    """
    if value is None:
        return default_model_path()
    if str(value) in BUNDLED_MODELS:
        return bundled_model_path(str(value))
    return Path(value).resolve()


def is_bundled(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the package's own model files (present on every node that has fkp)."""
    return any(Path(path) == bundled_model_path(name) for name in BUNDLED_MODELS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the mode any new file of the user's gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: KeypointNet, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``NAME.pt`` and ``NAME.json`` atomically; returns the ``.pt`` path."""
    pt_path, json_path = _paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(pt_path, buf.getvalue())
    meta = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "weights_file": pt_path.name,
        "sha256": _sha256(pt_path),
        "parameters": sum(p.numel() for p in model.parameters()),
        **(metadata or {}),
    }
    _atomic_write(json_path, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())
    return pt_path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON beside a model file, checked for format."""
    _, json_path = _paths(path)
    if not json_path.is_file():
        raise ModelFileError(f"{json_path}: model metadata file is missing")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{json_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{json_path}: not an fkp model metadata file (format {meta.get('format')!r})")
    return meta


def _read_state_dict(pt_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, refused unless ``torch.load(weights_only=True)`` reads a plain state_dict."""
    try:
        state = torch.load(pt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError...: all mean "refused"
        raise ModelFileError(f"{pt_path}: cannot load weights safely ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{pt_path}: not a state_dict of tensors")
    return state


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load weights + metadata (``path``: a file, a ``BUNDLED_MODELS`` name, or None for the default), in eval mode."""
    pt_path, json_path = _paths(resolve_model_path(path))
    if not pt_path.is_file():
        hint = " (a bundled model is missing: reinstall fkp)" if is_bundled(pt_path) else ""
        raise ModelFileError(f"{pt_path}: model file not found{hint}")
    meta = read_metadata(pt_path)
    expected = meta.get("sha256")
    if expected and _sha256(pt_path) != expected:
        raise ModelFileError(f"{pt_path}: checksum does not match {json_path.name}: file damaged or replaced")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{json_path}: bad model config ({exc})") from exc
    state = _read_state_dict(pt_path)
    model = KeypointNet(config)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(f"{pt_path}: weights do not fit the config in {json_path.name}: {first}") from exc
    score = meta.get("keypoint_score")
    if model.has_scores and isinstance(score, dict) and {"sharp", "flat"} <= set(score):
        model.head.score_range = (float(score["sharp"]), float(score["flat"]))
    model.eval().to(device)
    return LoadedModel(model=model, config=config, metadata=meta, path=pt_path)
