"""Checkpoints: exact round trip, atomic writes, no unpickling, clear refusals."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CONFIGS
from safetensors import safe_open
from safetensors.torch import save, save_file

from hiss_ros import checkpoint
from hiss_ros.checkpoint import FORMAT_VERSION, load_checkpoint, read_metadata, save_checkpoint
from hiss_ros.errors import CheckpointError
from hiss_ros.models import build_model

REPO = Path(__file__).resolve().parents[1]

NORM = {"input_mean": [0.1] * 6, "input_std": [2.0] * 6, "output_mean": [0.0] * 3, "output_std": [1.0] * 3}


def rewrite_metadata(path, **changes):
    """Rewrite the checkpoint at ``path`` with some metadata keys changed (weights kept)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hiss_ros"])
    meta.update(changes)
    save_file(tensors, str(path), metadata={"hiss_ros": json.dumps(meta)})


@pytest.mark.parametrize("name", ["hiss-s4d-mamba", "hiss-lstm-transformer", "flat-mamba", "flat-s4d"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = build_model(MODEL_CONFIGS[name]).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, NORM, data={"input_rate_hz": 200})
    ckpt = load_checkpoint(path)
    x = torch.randn(2, 60, 6)
    with torch.no_grad():
        assert torch.equal(model(x), ckpt.model(x))
    assert ckpt.config == model.config
    assert ckpt.normalization == NORM
    assert ckpt.data == {"input_rate_hz": 200}
    assert not ckpt.model.training


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["flat-lstm"]))

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(path)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    first = build_model(MODEL_CONFIGS["flat-s4d"])
    save_checkpoint(path, first)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(path, build_model(MODEL_CONFIGS["flat-mamba"]))
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp file left


def test_write_flushes_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """Durable across a power cut: the data is on disk before the rename, the rename after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["flat-s4d"]))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_unknown_format_version_is_refused_by_number(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["flat-s4d"]))
    rewrite_metadata(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        load_checkpoint(path)


def test_config_that_does_not_match_weights_names_the_tensors(tmp_path):
    model = build_model(MODEL_CONFIGS["hiss-s4d-mamba"])
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    stored = read_metadata(path)["model"]
    rewrite_metadata(path, model={**stored, "high": {**stored["high"], "d_model": 24}})
    with pytest.raises(CheckpointError, match=r"weights do not match the stored model config: .*high\.encoder\.weight"):
        load_checkpoint(path)


def test_expected_config_difference_names_the_fields(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["hiss-s4d-mamba"]))
    other = json.loads(json.dumps(MODEL_CONFIGS["hiss-s4d-mamba"]))
    other["chunk"] = 20
    other["low"]["n_layers"] = 3
    with pytest.raises(CheckpointError, match=r"chunk: expected 20, got 10; low.n_layers: expected 3, got 2"):
        load_checkpoint(path, expected_config=other)


def test_invalid_stored_config_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["flat-s4d"]))
    rewrite_metadata(path, model={**read_metadata(path)["model"], "chunk": -1})
    with pytest.raises(CheckpointError, match=r"stored model config is invalid: flat.chunk = -1"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a readable safetensors file"),
    (None, "no such checkpoint file"),
])
def test_unreadable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="without hiss_ros metadata"):
        load_checkpoint(path)


# --- Hostile files: each is refused with one CheckpointError line naming the file ---------------


def parts(tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a valid small checkpoint (flat LSTM, 6 inputs, 3 outputs)."""
    path = save_checkpoint(tmp_path / "valid.safetensors", build_model(MODEL_CONFIGS["flat-lstm"]), NORM)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["hiss_ros"])


def write(tmp_path, tensors: dict[str, torch.Tensor], meta, encode=json.dumps) -> Path:
    """A safetensors file with ``encode(meta)`` as its hiss_ros metadata."""
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(save(tensors, metadata={"hiss_ros": encode(meta)}))
    return path


def refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize("meta, kind", [([1, 2, 3], "array"), ("a string", "string"), (7, "number"), (None, "null")])
def test_metadata_that_is_not_a_json_object_is_refused(tmp_path, meta, kind):
    tensors, _ = parts(tmp_path)
    refused(write(tmp_path, tensors, meta), f"metadata is a JSON {kind} .*expected an object; re-export")


@pytest.mark.parametrize("key, value, got", [
    ("model", [1], "a JSON array"), ("normalization", "identity", "a JSON string"), ("data", None, "missing"),
])
def test_metadata_sections_of_the_wrong_type_are_refused(tmp_path, key, value, got):
    tensors, meta = parts(tmp_path)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    refused(write(tmp_path, tensors, meta), f"metadata.{key} is {got}, expected an object")


def test_hostile_config_value_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    meta["model"]["kind"] = {"not": "hashable"}
    refused(write(tmp_path, tensors, meta), "stored model config is invalid")


def test_missing_normalisation_key_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    del meta["normalization"]["input_mean"]
    refused(write(tmp_path, tensors, meta), r"normalization lacks \['input_mean'\]: it must be \{\} or hold exactly")


def test_unknown_normalisation_key_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    meta["normalization"]["input_scale"] = [1.0] * 6
    refused(write(tmp_path, tensors, meta), r"normalization has unknown keys \['input_scale'\]")


def test_wrong_length_output_std_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    meta["normalization"]["output_std"] = [1.0, 1.0]
    refused(write(tmp_path, tensors, meta), r"normalization.output_std is 2 values, expected a list of 3 "
                                            r"\(the model's output_dim\)")


def test_input_normalisation_is_as_long_as_the_raw_inputs_not_the_delta_features(tmp_path):
    tensors, meta = parts(tmp_path)
    assert meta["model"]["deltas"]  # the model sees 12 feature channels, normalisation covers the 6 raw ones
    meta["normalization"].update(input_mean=[0.0] * 12, input_std=[1.0] * 12)
    refused(write(tmp_path, tensors, meta), r"normalization.input_mean is 12 values, expected a list of 6")


@pytest.mark.parametrize("value, problem", [
    (0.0, "expected > 0"), (-1.0, "expected > 0"), (float("nan"), "expected a finite number"),
    (float("inf"), "expected a finite number"), ("1.0", "expected a finite number"), (True, "expected a finite number"),
    (10**400, "expected a finite number"),
])
def test_bad_input_std_is_refused(tmp_path, value, problem):
    tensors, meta = parts(tmp_path)
    meta["normalization"]["input_std"][2] = value
    refused(write(tmp_path, tensors, meta), rf"normalization.input_std\[2\] = .*: {problem}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_by_name(tmp_path, value):
    tensors, meta = parts(tmp_path)
    tensors["layers.blocks.1.norm.weight"][3] = value
    refused(write(tmp_path, tensors, meta), r"weight layers.blocks.1.norm.weight holds 1 non-finite value")


@pytest.fixture
def builds(monkeypatch) -> list[torch.device]:
    """The device of every model load_checkpoint builds."""
    devices: list[torch.device] = []

    def spy(config):
        model = build_model(config)
        devices.append(next(model.parameters()).device)
        return model

    monkeypatch.setattr(checkpoint, "build_model", spy)
    return devices


def test_huge_d_model_is_refused_at_once_by_the_size_bound(tmp_path, builds):
    tensors, meta = parts(tmp_path)  # a file of a few KB asking for ~10^19 parameters
    meta["model"]["layers"]["d_model"] = 10**9
    path = write(tmp_path, tensors, meta)
    start = time.perf_counter()
    refused(path, r"model.layers.d_model = 1000000000 exceeds the size bound 65536 "
                  r"\(hiss_ros.checkpoint.MAX_SIZE\)")
    assert time.perf_counter() - start < 2.0
    assert builds == []  # refused from the config alone


def test_huge_n_layers_is_refused_by_the_layer_bound(tmp_path, builds):
    tensors, meta = parts(tmp_path)
    meta["model"]["layers"]["n_layers"] = 10**6
    refused(write(tmp_path, tensors, meta), r"model.layers.n_layers = 1000000 exceeds the size bound 64")
    assert builds == []


def test_too_many_parameters_are_refused_after_sizing_on_the_meta_device(tmp_path, builds):
    tensors, meta = parts(tmp_path)
    meta["model"]["layers"]["d_model"] = 4096  # within MAX_SIZE, but two LSTM layers of 134 M parameters each
    start = time.perf_counter()
    refused(write(tmp_path, tensors, meta), r"asks for 268,\d{3},\d{3} parameters, over the size bound 50,000,000")
    assert time.perf_counter() - start < 2.0
    assert builds == [torch.device("meta")]  # nothing real was allocated


def test_unexpected_extra_tensor_is_refused(tmp_path, builds):
    tensors, meta = parts(tmp_path)
    tensors["extra"] = torch.zeros(2)
    refused(write(tmp_path, tensors, meta), r"weights do not match the stored model config: unexpected extra \(2,\)")
    assert builds == [torch.device("meta")]  # refused from the header, before reading any tensor


def test_missing_tensor_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    del tensors["head.bias"]
    refused(write(tmp_path, tensors, meta), r"weights do not match the stored model config: missing head.bias \(3,\)")


def test_wrong_dtype_is_refused(tmp_path):
    tensors, meta = parts(tmp_path)
    tensors["head.bias"] = tensors["head.bias"].double()
    refused(write(tmp_path, tensors, meta), r"head.bias: stored dtype F64, config needs F32")


@pytest.mark.parametrize("content, match", [
    (b"\xff" * 8 + b"{}", "not a readable safetensors file"),  # header length of 2^64 - 1
    (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "not a readable safetensors file"),  # a header that is a list
])
def test_damaged_headers_are_refused(tmp_path, content, match):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(content)
    refused(path, match)


def test_invalid_metadata_json_is_refused(tmp_path):
    tensors, _ = parts(tmp_path)
    refused(write(tmp_path, tensors, "[" * 100_000, encode=str), "metadata is not valid JSON")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o644)])
def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", build_model(MODEL_CONFIGS["flat-lstm"]))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("name", ["contact", "broad_velocity"])
def test_shipped_models_still_load(name):
    ckpt = load_checkpoint(REPO / "models" / f"{name}.safetensors")
    cfg = ckpt.config
    assert len(ckpt.normalization["input_std"]) == cfg.input_dim
    assert len(ckpt.normalization["output_std"]) == cfg.output_dim
    with torch.no_grad():
        y = ckpt.model(torch.zeros(1, 2 * cfg.chunk, cfg.input_dim))
    assert y.shape == (1, 2, cfg.output_dim) and torch.isfinite(y).all()
