"""Checkpoints: one ``.safetensors`` file holding the weights and, in its header, JSON metadata.

Loading never unpickles (safetensors is a flat tensor table; the metadata is JSON), and writes
are atomic: the file is written beside the target, flushed to disk, then renamed over it, so a
crash leaves either the old checkpoint or the new one, never half of one.

Metadata layout (key ``hiss_ros`` of the safetensors header, a JSON object):
    format:          "hiss_ros.checkpoint"
    format_version:  FORMAT_VERSION
    model:           the model config (``config_to_dict``)
    normalization:   {"input_mean": [...], "input_std": [...], "output_mean": [...], "output_std": [...]}
                     or {} (identity)
    data:            free-form data spec the trainer adds (streams, rates, filter, ...)
    hiss_ros_version, created (UTC ISO 8601)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from hiss_ros import __version__
from hiss_ros.errors import CheckpointError, ConfigError
from hiss_ros.models import ChunkedModel, ModelConfig, build_model, config_to_dict, model_config_from_dict

FORMAT = "hiss_ros.checkpoint"
FORMAT_VERSION = 1
_META_KEY = "hiss_ros"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on CPU) and everything stored beside it."""

    model: ChunkedModel
    config: ModelConfig
    normalization: dict[str, list[float]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    model: ChunkedModel,
    normalization: dict[str, list[float]] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its config, normalisation and data spec to ``path`` atomically."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(model.config),
        "normalization": normalization or {},
        "data": data or {},
        "hiss_ros_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(tensors, metadata={_META_KEY: json.dumps(meta)}))
    return path


def atomic_write(path: Path, blob: bytes) -> None:
    """Write ``blob`` to a temp file beside ``path``, flush it to disk, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, validated for format and version (weights are not read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without hiss_ros metadata (not a hiss_ros checkpoint)")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is not supported; this hiss_ros "
            f"({__version__}) reads format_version {FORMAT_VERSION}"
        )
    return meta


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _check_weights(path: Path, model: ChunkedModel, state: dict[str, torch.Tensor]) -> None:
    """Raise naming every tensor that is missing, unexpected, or of another shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in stored]
    problems += [f"unexpected {k} {s}" for k, s in stored.items() if k not in expected]
    problems += [
        f"{k}: stored {stored[k]}, config needs {s}" for k, s in expected.items() if k in stored and stored[k] != s
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{path}: weights do not match the stored model config: {shown}")


def load_checkpoint(path: str | os.PathLike, expected_config: ModelConfig | dict | None = None) -> Checkpoint:
    """Rebuild the model from the file alone. With ``expected_config``, also refuse a checkpoint
    whose config differs, naming the differing fields."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = model_config_from_dict(meta.get("model"))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: stored model config is invalid: {exc}") from None
    if expected_config is not None:
        diff = config_diff(model_config_from_dict(expected_config), config)
        if diff:
            raise CheckpointError(f"{path}: model config differs from the expected one: {'; '.join(diff)}")
    model = build_model(config)
    state = _load_state(path)
    _check_weights(path, model, state)
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, config, meta.get("normalization", {}), meta.get("data", {}), meta)


def config_diff(expected: ModelConfig, actual: ModelConfig) -> list[str]:
    """'field: expected X, got Y' for each differing (nested, dotted) field."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.append(f"{prefix}: expected {a!r}, got {b!r}")

    walk(config_to_dict(expected), config_to_dict(actual), "")
    return out
