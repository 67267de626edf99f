"""Input novelty (hiss_ros.pipeline.novelty): fitted by the trainer, stored, scored per estimate,
raising the variance head's variance on input unlike the training data (issue #14)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import CHUNK

from hiss_ros.errors import CheckpointError, ConfigError
from hiss_ros.pipeline import Chunk, Normalization
from hiss_ros.pipeline.novelty import FLOOR, MAX_INFLATION, Novelty, features
from hiss_ros.serving import StreamingEstimator, load_model, save_model
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import Dataset, Split
from hiss_ros.train.loop import train

C = 9  # config/train.yaml's input channels


def chunks(rng: np.random.Generator, k: int) -> np.ndarray:
    """(k, CHUNK, C) normalised inputs: a slowly varying level per channel (a stationary AR(1)
    over chunks) plus noise, as sensors give."""
    level, noise = np.zeros((k, 1, C)), rng.normal(size=(k, 1, C))
    for i in range(1, k):
        level[i] = 0.95 * level[i - 1] + 0.3 * noise[i]
    return (level + rng.normal(scale=0.5, size=(k, CHUNK, C))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    return Novelty.fit([chunks(rng, 2000), chunks(rng, 1000)], inflate=True), rng


def test_typical_chunks_score_about_one_and_faults_score_far_above_the_warn_level(fitted):
    nov, _ = fitted
    held_out = chunks(np.random.default_rng(7), 2000)
    score = nov.score(held_out)
    assert 0.8 < np.median(score) < 1.25
    assert (score > nov.warn).mean() < 0.01  # the warn level: 99.9 % of training chunks stay below it
    frozen = held_out[:200].copy()
    frozen[:, :, 3] = frozen[:, :1, 3]  # one channel stuck at its last value
    saturated = held_out[:200].copy()
    saturated[:, :, 5] = 8.0  # one channel pinned at 8 training sigma
    for fault in (frozen, saturated):
        assert np.median(nov.score(fault)) > 3 * nov.warn
        assert (nov.inflation(fault) > 3 * nov.warn).all()
    assert np.median(nov.score(frozen)) > 10 * np.median(score)


def test_features_and_score_are_the_documented_statistics_bit_for_bit(fitted):
    """The per-estimate fast path (one pass of ufunc reductions) is exactly the chunk mean and
    log(std + FLOOR) the trainer's statistics were fitted on, for one chunk and for a batch."""
    novelty, rng = fitted
    for x in (chunks(rng, 1)[0], chunks(rng, 50), chunks(rng, 6).astype(np.float64) * 40.0):
        plain = np.concatenate([x.astype(np.float64).mean(-2), np.log(x.astype(np.float64).std(-2) + FLOOR)], -1)
        assert np.array_equal(features(x), plain)
        assert np.array_equal(novelty.score(x), (((plain - novelty.mean) / novelty.std) ** 2).mean(-1)
                              / novelty.reference)


def test_inflation_is_never_below_one_bounded_and_off_without_inflate(fitted):
    nov, _ = fitted
    x = chunks(np.random.default_rng(1), 500)
    infl = nov.inflation(x)
    np.testing.assert_array_equal(infl, np.clip(nov.score(x), 1, MAX_INFLATION))
    assert infl.min() == 1.0 and infl.max() > 1.0
    wild = np.full((3, CHUNK, C), 1e6, np.float32)
    assert (nov.inflation(wild) == MAX_INFLATION).all() and np.isfinite(nov.score(wild)).all()
    off = Novelty.from_dict({**nov.to_dict(), "inflate": False})
    np.testing.assert_array_equal(off.inflation(x), 1.0)
    np.testing.assert_array_equal(off.score(x), nov.score(x))


def test_round_trip_and_errors(fitted):
    nov, _ = fitted
    back = Novelty.from_dict(json.loads(json.dumps(nov.to_dict())))
    assert back.to_dict() == nov.to_dict()
    good = nov.to_dict()
    for patch, message in [
        ({"reference": 0}, "novelty.reference = 0: expected a positive number"),
        ({"warn": float("nan")}, "novelty.warn = nan: expected a positive number"),
        ({"std": [0.0] * 18}, "every std must be > 0"),
        ({"mean": [0.0] * 3}, "novelty.mean: expected an even number of finite numbers, got 3"),
        ({"mean": "x"}, "novelty.mean: expected a list of numbers"),
        ({"inflate": 1}, "novelty.inflate = 1: expected true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Novelty.from_dict({**good, **patch})
    with pytest.raises(ConfigError, match=r"novelty: expected the keys"):
        Novelty.from_dict({k: v for k, v in good.items() if k != "warn"})


# --- through training, a checkpoint and serving -------------------------------------------------

MODEL = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1, "dropout": 0.0},
         "high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "dropout": 0.0}}
SEQ = 16


def config(**train) -> TrainConfig:
    data = yaml.safe_load(open("config/train.yaml"))
    data["model"] = {**MODEL, "variance": train.get("loss") == "nll"}
    data["train"] = {"epochs": 6, "batch_size": 8, "lr": 1e-2, "seq_chunks": SEQ, "seed": 0, **train}
    return TrainConfig.from_dict(data)


def task(segments: int, k: int, rng: np.random.Generator) -> Split:
    """Targets: input channel 0 at the chunk's last sample, plus noise."""
    xs = [chunks(rng, k) for _ in range(segments)]
    ys = [(x[:, -1, :3] + 0.2 * rng.standard_normal((k, 3))).astype(np.float32) for x in xs]
    return Split(xs, ys, [np.arange(k, dtype=np.int64) for _ in xs])


@pytest.fixture(scope="module")
def nll_run(tmp_path_factory):
    rng = np.random.default_rng(3)
    ds = Dataset(task(4, 8 * SEQ, rng), task(2, 4 * SEQ, rng), (6, 3), 3, CHUNK, Normalization.identity(C, 3))
    out = tmp_path_factory.mktemp("novelty")
    torch.manual_seed(0)
    train(config(loss="nll"), ds, out, progress=False)
    return out, ds


def test_the_trainer_stores_the_statistics_and_calibrates_with_the_inflation(nll_run, tmp_path):
    out, ds = nll_run
    spec = load_model(out).spec
    assert spec.novelty is not None and spec.novelty.inflate
    refit = Novelty.fit(ds.train.x, inflate=True)
    np.testing.assert_allclose(spec.novelty.mean, refit.mean)
    assert spec.novelty.reference == pytest.approx(refit.reference)
    metrics = json.loads((out / "metrics.json").read_text())  # mean z^2 = 1 with the inflation applied
    assert metrics["val_calibration"]["mean_z2"] == pytest.approx({c: 1.0 for c in metrics["variance_scale"]}, rel=1e-4)
    # a model without the head: statistics for /diagnostics, no inflation
    rng = np.random.default_rng(4)
    plain = Dataset(task(2, 4 * SEQ, rng), task(1, 2 * SEQ, rng), (6, 3), 3, CHUNK, Normalization.identity(C, 3))
    train(config(epochs=1), plain, tmp_path / "mse", progress=False)
    mse = load_model(tmp_path / "mse").spec.novelty
    assert mse is not None and not mse.inflate
    # train.novelty_inflation false: the head's variance alone
    train(config(loss="nll", epochs=1, novelty_inflation=False), plain, tmp_path / "off", progress=False)
    assert not load_model(tmp_path / "off").spec.novelty.inflate


def test_a_frozen_or_saturated_channel_raises_the_served_variance(nll_run):
    """An injected sensor fault: the estimates' variance rises (while the head alone barely moves)."""
    out, _ = nll_run
    est = StreamingEstimator.from_checkpoint(out)
    x = chunks(np.random.default_rng(11), 60)
    frozen, saturated = x.copy(), x.copy()
    frozen[:, :, 0] = frozen[:1, :1, 0]  # the channel the targets follow, stuck
    saturated[:, :, 1] = 8.0

    def served(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        est.restart()
        got = [est.estimate(Chunk(k, xk, est.episode)) for k, xk in enumerate(xs)]
        return np.stack([g.variance for g in got])[20:], np.array([g.novelty for g in got])[20:]

    (v_ok, n_ok), (v_frozen, n_frozen), (v_sat, n_sat) = served(x), served(frozen), served(saturated)
    warn = est.spec.novelty.warn
    assert np.median(n_ok) < warn < min(np.median(n_frozen), np.median(n_sat))
    assert np.median(v_frozen) > 5 * np.median(v_ok) and np.median(v_sat) > 5 * np.median(v_ok)


def test_scoring_left_to_the_caller_keeps_the_variance_and_batch_scores_equal_the_per_estimate_ones(nll_run, tmp_path):
    """``score_novelty = False`` (the node, whose diagnostics score chunks in batches): an estimate
    whose variance needs the score still has it; one that does not, leaves it to the caller, whose
    batch of the same chunks scores bit for bit as every estimate did."""
    def served(est: StreamingEstimator, xs: np.ndarray) -> list:
        est.restart()
        return [est.estimate(Chunk(k, xk, est.episode)) for k, xk in enumerate(xs)]

    x = chunks(np.random.default_rng(12), 30)
    out, _ = nll_run
    with_head = StreamingEstimator.from_checkpoint(out)
    every = served(with_head, x)
    with_head.score_novelty = False
    assert [(e.values.tolist(), e.variance.tolist(), e.novelty) for e in served(with_head, x)] == [
        (e.values.tolist(), e.variance.tolist(), e.novelty) for e in every]
    rng = np.random.default_rng(5)  # a model without the head
    train(config(epochs=1), Dataset(task(2, 4 * SEQ, rng), task(1, 2 * SEQ, rng), (6, 3), 3, CHUNK,
                                    Normalization.identity(C, 3)), tmp_path / "mse", progress=False)
    plain = StreamingEstimator.from_checkpoint(tmp_path / "mse")
    every = served(plain, x)
    plain.score_novelty = False
    later = served(plain, x)
    assert all(e.novelty is None for e in later) and all(e.novelty is not None for e in every)
    assert [e.values.tolist() for e in later] == [e.values.tolist() for e in every]
    assert plain.spec.novelty.score(np.stack(x)).tolist() == [e.novelty for e in every]


def test_an_incompatible_statistic_is_refused_and_a_checkpoint_without_it_serves(nll_run, tmp_path):
    out, _ = nll_run
    loaded = load_model(out)
    bad = loaded.spec.novelty.to_dict()
    bad["mean"], bad["std"] = bad["mean"][:4], bad["std"][:4]
    data = {**loaded.data, "novelty": bad}
    from hiss_ros.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "bad.safetensors", loaded.model, loaded.spec.normalization.to_dict(), data)
    with pytest.raises(CheckpointError, match="novelty statistics of 2 input channels, the pipeline has 9"):
        load_model(tmp_path / "bad.safetensors")
    model = loaded.model
    save_model(tmp_path / "old.safetensors", model, replace(loaded.spec, novelty=None))
    old = StreamingEstimator.from_checkpoint(tmp_path / "old.safetensors")  # an older trainer's: still served
    (e,) = [old.estimate(Chunk(0, chunks(np.random.default_rng(0), 1)[0], old.episode))]
    assert old.spec.novelty is None and e.novelty is None and e.variance is not None
