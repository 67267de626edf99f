"""Checkpoints: one ``.safetensors`` file holding the weights and, in its header, JSON metadata.

Loading never unpickles (safetensors is a flat tensor table; the metadata is JSON), and writes
are atomic: the file is written beside the target, flushed to disk, then renamed over it, so a
crash leaves either the old checkpoint or the new one, never half of one.

A checkpoint is untrusted input: ``load_checkpoint`` checks everything before it allocates
anything. First the metadata schema, the model config and its sizes (``MAX_LAYERS``,
``MAX_SIZE``), and the normalisation; then the parameter count of a model built on the meta
device (shapes only, no memory) against ``MAX_PARAMETERS``, and the names, shapes and dtypes of
the stored tensors, read from the safetensors header without their data. Only then are the
tensors read (each must be finite) and the real model built. Every refusal is one
``CheckpointError`` line naming the file, the problem and the fix; no other exception escapes.

Metadata layout (key ``hiss_ros`` of the safetensors header, a JSON object):
    format:          "hiss_ros.checkpoint"
    format_version:  FORMAT_VERSION
    model:           the model config (``config_to_dict``)
    normalization:   {"input_mean": [...], "input_std": [...], "output_mean": [...], "output_std": [...]}
                     (input lists input_dim long, output lists output_dim long; std > 0) or {} (identity)
    data:            free-form data spec the trainer adds (streams, rates, filter, ...)
    hiss_ros_version, created (UTC ISO 8601)
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from hiss_ros import __version__
from hiss_ros.errors import CheckpointError
from hiss_ros.models import ChunkedModel, ModelConfig, build_model, config_to_dict, model_config_from_dict

FORMAT = "hiss_ros.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"  # the checkpoint in a hiss-train output folder
_META_KEY = "hiss_ros"

# Size bounds of a loadable model. Parameters: 50 M float32 are 200 MB, well above any model
# trained here (the shipped ones have ~0.1 M). Layers per stack: each block takes milliseconds
# to build even on the meta device, so a hostile n_layers must be refused before building.
# Any other size in the config (widths, state sizes, heads, chunk, attention context) sets a
# tensor dimension, a loop at construction or a buffer at run time.
MAX_PARAMETERS = 50_000_000
MAX_LAYERS = 64
MAX_SIZE = 65_536

# Normalisation key -> the config field its length must equal (inputs: raw channels, before any delta channels).
_NORM_DIMS = {
    "input_mean": "input_dim", "input_std": "input_dim", "output_mean": "output_dim", "output_std": "output_dim",
}
# safetensors' names of the floating dtypes a model's state can hold.
_DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}
_RESAVE = "re-export the model with hiss_ros.checkpoint.save_checkpoint (hiss-train does) or use another checkpoint"
_TOO_LARGE = "hiss_ros loads no model this large: train a smaller one or use another checkpoint"
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_FILE_MODE = 0o644  # filtered by the umask: other users (an estimator running as another user) can read it

_Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype name, shape)
_Expected = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # state-dict key -> (dtype, shape)


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
    """Write ``blob`` to a temp file beside ``path``, flush it to disk, rename it over ``path``, and
    flush the folder (the rename itself).
    The file gets mode 0644 less the process umask, as ``open`` would give it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk, so that a rename into it survives a power cut; best effort
    (a platform or file system without directory fsync keeps the rename, synced or not)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refuse(path: Path, problem: str, fix: str = _RESAVE) -> CheckpointError:
    """The one-line error for ``path``: what is wrong, then what would fix it."""
    return CheckpointError(" ".join(f"{path}: {problem}; {fix}".splitlines()))


def _clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: a hostile value can be megabytes long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "null")


@contextmanager
def _refusing(path: Path, doing: str) -> Iterator[None]:
    """Turn any exception but a CheckpointError raised while ``doing`` into a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise _refuse(path, f"{doing} failed ({type(exc).__name__}: {_clip(str(exc), 300)})") from None


def _read_header(path: Path) -> tuple[dict[str, str], _Header]:
    """The safetensors header: string metadata, and dtype name and shape per tensor (no data read)."""
    if not path.is_file():
        raise _refuse(path, "no such checkpoint file", "check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return f.metadata() or {}, {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
    except Exception as exc:
        raise _refuse(path, f"not a readable safetensors file ({_clip(str(exc), 300)})") from None


def _parse_metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    """The hiss_ros metadata of a header, checked for format, version and the type of each section."""
    if _META_KEY not in header:
        raise _refuse(path, "safetensors file without hiss_ros metadata (not a hiss_ros checkpoint)")
    try:
        meta = json.loads(header[_META_KEY])
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, f"metadata is not valid JSON ({_clip(str(exc))})") from None
    if not isinstance(meta, dict):
        raise _refuse(path, f"metadata is a JSON {_json_type(meta)} ({_clip(repr(meta))}), expected an object")
    if meta.get("format") != FORMAT:
        raise _refuse(path, f"metadata format is {_clip(repr(meta.get('format')))}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _refuse(
            path,
            f"checkpoint format_version {_clip(repr(version))} is not supported; this hiss_ros ({__version__}) "
            f"reads format_version {FORMAT_VERSION}",
            "load it with the hiss_ros version that wrote it, or re-export it with this one",
        )
    for key in ("model", "normalization", "data"):
        if not isinstance(meta.get(key), dict):
            got = "missing" if key not in meta else f"a JSON {_json_type(meta[key])}"
            raise _refuse(path, f"metadata.{key} is {got}, expected an object")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, validated for format, version and section types (weights are not read)."""
    path = Path(path)
    return _parse_metadata(path, _read_header(path)[0])


def _parse_config(path: Path, data: dict[str, Any]) -> ModelConfig:
    """The stored model config, validated field by field."""
    try:
        return model_config_from_dict(data)
    except Exception as exc:  # a ConfigError, or a TypeError from a hostile value such as an unhashable kind
        raise _refuse(path, f"stored model config is invalid: {_clip(str(exc), 300)}") from None


def _finite(value: Any) -> bool:
    """Whether ``value`` is a JSON number that is a finite float (not a bool, nor an int beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_normalization(path: Path, norm: dict[str, Any], config: ModelConfig) -> None:
    """{} or the four lists of finite numbers, as long as the model's input/output dims, std > 0."""
    if not norm:
        return
    missing, unknown = sorted(set(_NORM_DIMS) - set(norm)), sorted(set(norm) - set(_NORM_DIMS))
    if missing or unknown:
        wrong = (f"lacks {missing}" if missing else "") + (" and " if missing and unknown else "")
        wrong += f"has unknown keys {_clip(repr(unknown))}" if unknown else ""
        raise _refuse(path, f"normalization {wrong}: it must be {{}} or hold exactly {sorted(_NORM_DIMS)}")
    for key, dim_name in _NORM_DIMS.items():
        values, dim = norm[key], getattr(config, dim_name)
        if not isinstance(values, list) or len(values) != dim:
            got = f"{len(values)} values" if isinstance(values, list) else f"a JSON {_json_type(values)}"
            raise _refuse(path, f"normalization.{key} is {got}, expected a list of {dim} (the model's {dim_name})")
        for i, v in enumerate(values):
            if not _finite(v):
                raise _refuse(path, f"normalization.{key}[{i}] = {_clip(repr(v))}: expected a finite number")
            if key.endswith("_std") and v <= 0:
                raise _refuse(path, f"normalization.{key}[{i}] = {v!r}: expected > 0 (a standard deviation)")


def _sizes(tree: dict[str, Any], prefix: str) -> Iterator[tuple[str, int]]:
    """(dotted name, value) of every int in a config dict (bools are not sizes)."""
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from _sizes(value, name)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield name, value


def _check_sizes(path: Path, config: ModelConfig) -> None:
    """Refuse a config with more than MAX_LAYERS blocks in a stack or any other size over MAX_SIZE."""
    for name, value in _sizes(config_to_dict(config), "model"):
        bound, bound_name = (MAX_LAYERS, "MAX_LAYERS") if name.endswith(".n_layers") else (MAX_SIZE, "MAX_SIZE")
        if value > bound:
            limit = f"the size bound {bound} (hiss_ros.checkpoint.{bound_name})"
            raise _refuse(path, f"{name} = {_clip(repr(value))} exceeds {limit}", _TOO_LARGE)


def _expected_state(path: Path, config: ModelConfig) -> _Expected:
    """Dtype and shape of each state-dict entry ``config`` builds, from a model on the meta device
    (no memory allocated); refused past MAX_PARAMETERS."""
    with _refusing(path, "sizing the model on the meta device"), torch.device("meta"):
        state = build_model(config).state_dict()
    count = sum(v.numel() for v in state.values())
    if count > MAX_PARAMETERS:
        raise _refuse(
            path,
            f"the stored model config asks for {count:,} parameters, over the size bound {MAX_PARAMETERS:,} "
            "(hiss_ros.checkpoint.MAX_PARAMETERS)",
            _TOO_LARGE,
        )
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def _check_weights(path: Path, expected: _Expected, stored: _Header) -> None:
    """Raise naming every tensor that is missing, unexpected, or of another shape or dtype."""
    problems = [f"missing {k} {s}" for k, (_, s) in expected.items() if k not in stored]
    problems += [f"unexpected {_clip(k, 60)} {s}" for k, (_, s) in stored.items() if k not in expected]
    for k, (dtype, shape) in expected.items():
        dtype_name = _DTYPE_NAMES.get(dtype, str(dtype))
        if k in stored and stored[k][1] != shape:
            problems.append(f"{k}: stored {stored[k][1]}, config needs {shape}")
        elif k in stored and stored[k][0] != dtype_name:
            problems.append(f"{k}: stored dtype {stored[k][0]}, config needs {dtype_name}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise _refuse(path, f"weights do not match the stored model config: {shown}")


def _load_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each checked finite as it is read."""
    state: dict[str, torch.Tensor] = {}
    with _refusing(path, "reading the weights"), safe_open(str(path), framework="pt") as f:
        for name in names:
            tensor = f.get_tensor(name)
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise _refuse(
                    path, f"weight {name} holds {bad} non-finite value(s) (NaN or Inf)",
                    "training diverged or the file is damaged: use an earlier checkpoint or retrain",
                )
            state[name] = tensor
    return state


def load_checkpoint(path: str | os.PathLike, expected_config: ModelConfig | dict | None = None) -> Checkpoint:
    """Rebuild the model from the file alone, checking everything first (see the module doc).
    With ``expected_config``, also refuse a checkpoint whose config differs, naming the differing
    fields. Raises CheckpointError, or ConfigError for an invalid ``expected_config``."""
    path = Path(path)
    expected_cfg = None if expected_config is None else model_config_from_dict(expected_config)
    header, stored = _read_header(path)
    meta = _parse_metadata(path, header)
    config = _parse_config(path, meta["model"])
    _check_sizes(path, config)
    if expected_cfg is not None:
        diff = config_diff(expected_cfg, config)
        if diff:
            raise _refuse(
                path, f"model config differs from the expected one: {'; '.join(diff)}",
                "load the checkpoint trained for this config, or change the config",
            )
    _check_normalization(path, meta["normalization"], config)
    expected = _expected_state(path, config)
    _check_weights(path, expected, stored)
    state = _load_tensors(path, expected)
    with _refusing(path, "building the model"):
        model = build_model(config)
        model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, config, meta["normalization"], meta["data"], meta)


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
