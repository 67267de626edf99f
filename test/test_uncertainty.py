"""The variance head (issue #14): NLL training, post-hoc calibration, serving and hiss-eval.

Streaming == offline and causality with the head are covered by test_models.py's parametrised
tests (the ``*-variance`` entries of conftest.MODEL_CONFIGS).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import CHUNK

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.data.synthetic import contact_bag
from hiss_ros.errors import CheckpointError, ConfigError
from hiss_ros.models import build_model
from hiss_ros.pipeline import Normalization
from hiss_ros.serving import ServingSpec, StreamingEstimator, load_model, save_model
from hiss_ros.train.cli import main as train_main
from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.dataset import Dataset, Split
from hiss_ros.train.evaluate import main as eval_main
from hiss_ros.train.loop import batch_loss, predict_gaussian, train

SEQ = 16
QUIET, NOISY = 0.1, 1.0  # target noise std where input channel 1 is 0 / 1
MODEL = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1, "dropout": 0.0},
         "high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "dropout": 0.0}, "variance": True}


def tiny_config(model: dict | None = None, **train) -> TrainConfig:
    """config/train.yaml's streams (9 inputs, 3 outputs) with a tiny model."""
    data = yaml.safe_load(open("config/train.yaml"))
    data["model"] = model or MODEL
    data["train"] = {"epochs": 20, "batch_size": 8, "lr": 1e-2, "seq_chunks": SEQ, "seed": 0, "patience": 20, **train}
    return TrainConfig.from_dict(data)


def heteroscedastic(segments: int, chunks: int, rng: np.random.Generator) -> Split:
    """Input channel 0 white noise, channel 1 a noise switch (0 or 1, per chunk); every target is
    channel 0 at the chunk's last sample plus Gaussian noise of std QUIET or NOISY by the switch."""
    xs, ys = [], []
    for _ in range(segments):
        x = np.zeros((chunks, CHUNK, 9), np.float32)  # (K, chunk, C)
        x[:, :, 0] = rng.standard_normal((chunks, CHUNK))
        noisy = rng.random(chunks) < 0.5  # (K,)
        x[:, :, 1] = noisy[:, None]
        std = np.where(noisy, NOISY, QUIET)[:, None]  # (K, 1)
        ys.append((x[:, -1, :1] + std * rng.standard_normal((chunks, 3))).astype(np.float32))
        xs.append(x)
    return Split(xs, ys, [np.arange(chunks, dtype=np.int64) for _ in range(segments)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An NLL-trained variance head on the heteroscedastic task, its dataset and a held-out split."""
    rng = np.random.default_rng(0)
    ds = Dataset(heteroscedastic(4, 12 * SEQ, rng), heteroscedastic(2, 4 * SEQ, rng), (6, 3), 3, CHUNK,
                 Normalization.identity(9, 3))
    out = tmp_path_factory.mktemp("nll")
    torch.manual_seed(0)
    train(tiny_config(loss="nll", nll_warmup_epochs=1), ds, out, progress=False)
    return out, ds, heteroscedastic(4, 8 * SEQ, rng)


def test_nll_learns_larger_variance_where_the_noise_is_larger_and_covers_held_out_data(trained):
    out, _, test = trained
    served = load_model(out)
    mean, log_var = predict_gaussian(served.model, test)
    variance = served.spec.physical_variance(log_var, np.concatenate(test.x))  # (K, O), identity normalisation
    noisy = np.concatenate([x[:, -1, 1] for x in test.x]) > 0.5  # (K,)
    ratio = variance[noisy].mean() / variance[~noisy].mean()
    assert ratio > 10, f"variance noisy / quiet = {ratio:.2f}; the truth is {(NOISY / QUIET) ** 2:.0f}"
    z = np.abs(mean - np.concatenate(test.y)) / np.sqrt(variance)
    within_2 = (z <= 2).mean(0)
    # 512 held-out chunks per channel: the binomial spread of a calibrated 95.4% is about 1%
    assert ((within_2 > 0.88) & (within_2 < 0.99)).all(), f"2-sigma coverage per channel {within_2}"


def test_post_hoc_scale_makes_mean_z2_one_on_validation(trained):
    out, ds, _ = trained
    served = load_model(out)
    assert served.spec.variance_scale is not None and len(served.spec.variance_scale) == 3
    mean, log_var = predict_gaussian(served.model, ds.val)
    z2 = (mean - np.concatenate(ds.val.y)) ** 2 / served.spec.physical_variance(log_var, np.concatenate(ds.val.x))
    np.testing.assert_allclose(z2.mean(0), 1.0, rtol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variance_scale"].values()) == pytest.approx(list(served.spec.variance_scale))
    assert metrics["val_calibration"]["mean_z2"] == pytest.approx({c: 1.0 for c in metrics["variance_scale"]},
                                                                  rel=1e-4)


def test_beta_nll_at_beta_one_gives_the_mean_the_squared_error_gradient():
    """beta-NLL weights each element by its variance (held constant): at beta = 1 the mean's
    gradient is (mean - y), whatever the variance, as MSE's; plain NLL's is (mean - y) / variance."""
    model = build_model({**MODEL, "input_dim": 9, "output_dim": 3, "chunk": CHUNK})
    out = torch.cat([torch.randn(2, 4, 3), torch.randn(2, 4, 3)], dim=-1).requires_grad_()  # (b, k, 2*O)
    y = torch.randn(2, 4, 3)
    for beta, expected in ((1.0, out[..., :3] - y), (0.0, (out[..., :3] - y) / out[..., 3:].exp())):
        (grad,) = torch.autograd.grad(batch_loss(model, out, y, nll=True, beta=beta), out)
        torch.testing.assert_close(grad[..., :3], expected.detach())


def spec(scale: tuple[float, ...] | None = None) -> ServingSpec:
    """config/train.yaml's streams with a non-trivial output normalisation."""
    cfg = tiny_config()
    norm = Normalization(np.zeros(9), np.ones(9), np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 3.0]))
    return cfg.serving_spec((6, 3), norm, None, None if scale is None else list(scale))


def test_checkpoint_round_trip_keeps_the_scale_and_old_specs_still_load(tmp_path):
    model = build_model({**MODEL, "input_dim": 9, "output_dim": 3, "chunk": CHUNK})
    save_model(tmp_path / "m.safetensors", model, spec((0.5, 2.0, 4.0)))
    assert load_model(tmp_path / "m.safetensors").spec.variance_scale == (0.5, 2.0, 4.0)
    save_model(tmp_path / "old.safetensors", model, spec())  # as before calibration existed
    assert load_model(tmp_path / "old.safetensors").spec.variance_scale is None
    data = spec((1.0, 1.0, 1.0)).data()
    assert ServingSpec.from_metadata(data, spec().normalization.to_dict()).variance_scale == (1.0, 1.0, 1.0)


def test_serving_returns_the_variance_in_physical_units(tmp_path):
    """Estimate.variance = exp(log-variance) * output_std^2 * variance_scale, computed by hand from
    the model's offline output on the chunks the estimator's pipeline made."""
    torch.manual_seed(0)
    model = build_model({**MODEL, "input_dim": 9, "output_dim": 3, "chunk": CHUNK}).eval()
    scale, std, mean = np.array([0.5, 2.0, 4.0]), np.array([2.0, 0.5, 3.0]), np.array([1.0, -2.0, 0.5])
    save_model(tmp_path / "m.safetensors", model, spec(tuple(scale)))
    est = StreamingEstimator.from_checkpoint(tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    chunks = []
    for k in range(5 * CHUNK):
        t = 1_000_000_000 + k * 5_000_000  # 200 Hz, tactile at 50 Hz
        if k % 4 == 0:
            chunks += est.pipeline.push(1, t, rng.standard_normal(3))
        chunks += est.pipeline.push(0, t, rng.standard_normal(6))
    got = [est.estimate(c) for c in chunks]
    assert len(got) >= 3 and all(g is not None for g in got)
    with torch.no_grad():
        y = model(torch.from_numpy(np.concatenate([c.x for c in chunks]))[None])[0].double().numpy()  # (K, 6)
    np.testing.assert_allclose(np.stack([e.variance for e in got]), np.exp(y[:, 3:]) * std ** 2 * scale, rtol=1e-4)
    np.testing.assert_allclose(np.stack([e.values for e in got]), y[:, :3] * std + mean, rtol=1e-4, atol=1e-5)


def test_a_model_without_the_head_serves_no_variance_and_a_non_finite_variance_is_not_returned(tmp_path):
    plain = build_model({**MODEL, "variance": False, "input_dim": 9, "output_dim": 3, "chunk": CHUNK})
    save_model(tmp_path / "plain.safetensors", plain, spec())
    est = StreamingEstimator.from_checkpoint(tmp_path / "plain.safetensors")
    x = np.zeros((CHUNK, 9), np.float32)
    assert est.to_estimate(5, torch.zeros(3), x).variance is None
    save_model(tmp_path / "v.safetensors", build_model({**MODEL, "input_dim": 9, "output_dim": 3, "chunk": CHUNK}),
               spec())
    est = StreamingEstimator.from_checkpoint(tmp_path / "v.safetensors")
    assert est.to_estimate(5, torch.zeros(6), x).variance == pytest.approx([4.0, 0.25, 9.0])  # exp(0) * std^2
    assert est.to_estimate(5, torch.tensor([0.0, 0, 0, 0, float("nan"), 0]), x) is None
    assert est.counters["nonfinite_output"] == 1 and est.counters["estimates"] == 1


def test_hiss_eval_writes_calibration_metrics_and_plot(tmp_path):
    bag = contact_bag(tmp_path / "bag", seconds=20.0)
    cfg = yaml.safe_load(open("config/train.yaml"))
    cfg["model"] = MODEL
    cfg["train"] = {"epochs": 2, "batch_size": 8, "seq_chunks": 32, "loss": "nll"}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    common = ["--bag", str(bag), "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert train_main(["--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "run"), *common]) == 0
    assert eval_main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--split", "all",
                      *common]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cal, channels = ev["calibration"], list(ev["mse"])
    for key in ("within_1_sigma", "within_2_sigma", "within_3_sigma", "mean_z2", "nll"):
        assert list(cal[key]) == channels and all(np.isfinite(list(cal[key].values())))
    assert all(cal["within_1_sigma"][c] <= cal["within_2_sigma"][c] <= cal["within_3_sigma"][c] for c in channels)
    assert cal["ideal_within_sigma"] == [0.6827, 0.9545, 0.9973]
    assert len(cal["reliability"]["observed"][channels[0]]) == len(cal["reliability"]["expected"])
    assert (tmp_path / "ev" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith(f"std {channels[-1]}")
    novelty = ev["novelty"]  # the training bag itself: typical input
    assert novelty["variance_inflation"] is True and 0.3 < novelty["median"] < 3
    assert novelty["warn_level"] > 1 and novelty["fraction_above_warn_level"] < 0.05


@pytest.mark.parametrize("edit, message", [
    ({"loss": "l1"}, r"train.loss = 'l1': expected one of \['mse', 'nll'\]"),
    ({"loss": "nll", "nll_warmup_epochs": -1}, "train.nll_warmup_epochs = -1: expected an int >= 0"),
    ({"nll_warmup_epochs": 2}, "train.nll_warmup_epochs = 2: applies to train.loss nll only"),
    ({"loss": "nll", "nll_beta": 1.5}, r"train.nll_beta = 1.5: expected a number in \[0, 1\]"),
    ({"nll_beta": 0.5}, "train.nll_beta = 0.5: applies to train.loss nll only"),
])
def test_train_settings_errors_name_field_and_value(edit, message):
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**edit)


def test_nll_without_the_variance_head_is_refused():
    with pytest.raises(ConfigError, match=r"train\.loss = 'nll' needs the variance head: set model\.variance: true"):
        tiny_config({**MODEL, "variance": False}, loss="nll")
    cfg = tiny_config(loss="nll")
    with pytest.raises(ConfigError, match="needs the variance head"):
        replace(cfg, model={**MODEL, "variance": False})


@pytest.mark.parametrize("scale, message", [
    ((1.0, 2.0), r"variance_scale = \[1.0, 2.0\]: expected 3 finite positive numbers"),
    ((1.0, 0.0, 1.0), "expected 3 finite positive numbers"),
    ((1.0, float("inf"), 1.0), "expected 3 finite positive numbers"),
])
def test_spec_variance_scale_errors(scale, message):
    with pytest.raises(ConfigError, match=message):
        spec(scale)


def test_metadata_variance_scale_must_be_numbers_and_needs_the_head(tmp_path):
    data = {**spec().data(), "variance_scale": ["1", 1, 1]}
    with pytest.raises(ConfigError, match=r"data spec: variance_scale = \['1', 1, 1\]: expected a list of numbers"):
        ServingSpec.from_metadata(data, spec().normalization.to_dict())
    plain = build_model({**MODEL, "variance": False, "input_dim": 9, "output_dim": 3, "chunk": CHUNK})
    save_model(tmp_path / "m.safetensors", plain, spec((1.0, 1.0, 1.0)))
    with pytest.raises(CheckpointError, match="variance_scale, but the model has no variance head"):
        load_model(tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors").model is not None  # the file itself is sound
