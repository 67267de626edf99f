"""The ROS-free serving core: a checkpoint alone gives a streaming estimator that never returns
a non-finite estimate, and refuses checkpoints it could not serve with one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hiss_ros.errors import CheckpointError, HissError
from hiss_ros.models import StepRunner, build_model
from hiss_ros.serving import ServingSpec, StreamingEstimator, load_model, resolve_device

MS = 1_000_000


def stream(est: StreamingEstimator, seconds: float, start_ns: int = 1_000 * MS, imu=None):
    """Feed every input of ``est`` at its rate (stream 0 at the input clock, others at 1/4 of it,
    1 ns before stream 0's sample: not tied with it); ``imu(k)`` overrides the values of stream 0's
    k-th sample. Returns the estimates."""
    dims, rate = est.spec.pipeline.input_dims, est.spec.pipeline.input_rate_hz
    rng = np.random.default_rng(0)
    out = []
    for k in range(int(seconds * rate)):
        t = start_ns + round(k * 1e9 / rate)
        for i in range(1, len(dims)):
            if k % 4 == 0:
                out += est.push(i, t - 1, rng.standard_normal(dims[i]))
        values = rng.standard_normal(dims[0]) if imu is None or imu(k) is None else imu(k)
        out += est.push(0, t, values)
    return out


def test_a_shipped_model_by_name_streams_physical_estimates():
    est = StreamingEstimator.from_checkpoint("contact")
    assert est.path.endswith("models/contact.safetensors")
    assert est.spec.output_channels[0] == "/wrench_gt:wrench.force.x"
    got = stream(est, 1.0)
    chunk = est.spec.pipeline.chunk
    assert len(got) == int(est.spec.pipeline.input_rate_hz) // chunk  # one second of input
    assert all(e.values.shape == (len(est.spec.output_channels),) and np.isfinite(e.values).all() for e in got)
    assert np.diff([e.stamp_ns for e in got]).tolist() == [round(chunk * 1e9 / est.spec.pipeline.input_rate_hz)] * (
        len(got) - 1)
    assert est.counters["estimates"] == len(got) and len(est.step_seconds) == len(got)


def test_the_estimator_steps_through_its_runner_and_compile_says_why_not():
    est = StreamingEstimator.from_checkpoint("contact")
    assert isinstance(est.runner, StepRunner) and est.runner.model is est.model and est.runner.backend == "eager"
    with torch.inference_mode():
        assert est.runner.applies()  # the shipped model takes the fast step
    cfg = est.model.config
    layers = {"kind": "lstm", "d_model": 8, "n_layers": 1}
    flat = StreamingEstimator(build_model({"kind": "flat", "input_dim": cfg.input_dim, "output_dim": cfg.output_dim,
                                           "chunk": cfg.chunk, "layers": layers}), est.spec)
    assert flat.compile() == ("failed (ValueError: step backend 'compile' does not apply to this model: it covers "
                              "HiSS models only; this is a Flat model)")
    assert flat.runner.backend == "eager" and len(stream(flat, 0.2)) > 0


def test_a_burst_of_absurd_samples_is_rejected_and_never_poisons_the_state():
    est = StreamingEstimator.from_checkpoint("contact")
    got = stream(est, 2.0, imu=lambda k: np.full(6, 1e30) if 200 <= k < 205 else None)
    assert est.counters["out_of_range"] == 5
    after = [e for e in got if e.stamp_ns > 1_000 * MS + 205 * 2_500_000]
    assert len(after) > 50 and all(np.isfinite(e.values).all() for e in after)


def test_a_non_finite_output_is_counted_never_returned_and_resets_the_state():
    est = StreamingEstimator.from_checkpoint("contact")
    stream(est, 0.5)
    with torch.no_grad():
        est.model.head.bias[0] = float("nan")  # weights going bad under a running node
    assert stream(est, 0.5, start_ns=2_000 * MS) == []
    assert est.counters["nonfinite_output"] > 0 and est.counters["estimates"] > 0


def test_the_serving_spec_round_trips_through_checkpoint_metadata():
    loaded = load_model("broad_velocity")
    spec = loaded.spec
    again = ServingSpec.from_metadata(spec.data(), spec.normalization.to_dict())
    assert again.same_streams(spec) and again.validation_mse == spec.validation_mse
    assert spec.pipeline.chunk == loaded.model.config.chunk and spec.pipeline.channels == loaded.model.config.input_dim


def rewrite(src, dst, edit) -> None:
    """``src`` checkpoint with its metadata changed by ``edit(meta)`` (or its tensors, by ``edit(meta, tensors)``)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hiss_ros"])
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"hiss_ros": json.dumps(meta)})


# (Hostile files that no model could be built from are refused by load_checkpoint: test_checkpoint.py.)
@pytest.mark.parametrize("edit, message", [
    (lambda m, t: m["data"].pop("input_dims"), r"cannot be served: data spec: missing \['input_dims'\]"),
    (lambda m, t: m["data"]["outputs"].pop(), "output normalisation has 12 channels, the outputs name 6"),
    (lambda m, t: m["data"].update(output_rate_hz=80), "the model takes 21 channels in chunks of 10"),
    (lambda m, t: m["data"].update(validation={"mse_per_channel": "small"}), "expected a list of numbers"),
])
def test_checkpoints_that_would_not_serve_are_refused_in_one_line(tmp_path, edit, message):
    bad = tmp_path / "bad.safetensors"
    rewrite(load_model("contact").path, bad, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        StreamingEstimator.from_checkpoint(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_a_model_with_non_finite_outputs_is_refused_at_warm_up():
    est = StreamingEstimator.from_checkpoint("contact")
    with torch.no_grad():
        est.model.head.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite outputs on zero input"):
        est.warm_up()


def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(HissError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(HissError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("key, value", [("filter", "lowpass"), ("filter", [1]), ("strapdown", [1]),
                                        ("strapdown", {"gyro": [0, 1, 2], "accel": [3, 4, 99]}),
                                        ("validation", [1, 2])])
def test_a_data_spec_of_the_wrong_shape_is_one_checkpoint_error(tmp_path, key, value):
    from hiss_ros.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(load_model("contact").path)
    path = save_checkpoint(tmp_path / "m.safetensors", ckpt.model, ckpt.normalization, {**ckpt.data, key: value})
    with pytest.raises(CheckpointError, match=f"cannot be served: .*{key}"):
        load_model(path)
