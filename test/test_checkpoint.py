"""Checkpoints: exact round trip, atomic writes, no unpickling, clear refusals."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import MODEL_CONFIGS
from safetensors import safe_open
from safetensors.torch import save_file

from hiss_ros.checkpoint import FORMAT_VERSION, load_checkpoint, read_metadata, save_checkpoint
from hiss_ros.errors import CheckpointError
from hiss_ros.models import build_model

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
