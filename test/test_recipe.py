"""Training-recipe options: burn-in, step budget, no decay on SSM dynamics, scaled deltas, pooling."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CHUNK, hiss_config
from safetensors import safe_open

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.errors import ConfigError
from hiss_ros.models import StepRunner, build_model
from hiss_ros.pipeline import Normalization
from hiss_ros.sim import TRAIN_YAML
from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.dataset import Dataset, Split, delta_std
from hiss_ros.train.loop import STATE_FILE, param_groups, train

SEQ, BURN = 8, 3


def settings(**kw) -> TrainSettings:
    return TrainSettings(**{"epochs": 2, "batch_size": 4, "lr": 3e-3, "seq_chunks": SEQ, "seed": 3, **kw})


def tiny_config(s: TrainSettings, **model) -> TrainConfig:
    data = yaml.safe_load(open("config/train.yaml"))
    data["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1, "dropout": 0.0},
                     "high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "dropout": 0.0}, **model}
    data.pop("train")
    return replace(TrainConfig.from_dict(data), train=s)


def split(segments: int, chunks: int, rng: np.random.Generator) -> Split:
    """Random walks as inputs (9 channels, as config/train.yaml's streams), their sums as targets."""
    x = [np.cumsum(rng.normal(size=(chunks * CHUNK, 9)), 0).reshape(chunks, CHUNK, 9).astype(np.float32) / 10
         for _ in range(segments)]
    y = [xi[:, -1, :3].astype(np.float32) for xi in x]
    return Split(x, y, [np.arange(chunks, dtype=np.int64) for _ in range(segments)])


def dataset(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    norm = Normalization.identity(9, 3)
    return Dataset(split(3, 5 * SEQ, rng), split(1, 2 * SEQ, rng), (6, 3), 3, CHUNK, norm)


def weights(out) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "model.safetensors").model.state_dict()


def test_burn_in_targets_do_not_reach_the_loss(tmp_path):
    """Windows start every SEQ/2 chunks, so the first BURN chunks of a segment are in no window's
    loss: changing their targets changes nothing with burn-in, and the weights without it."""
    ds = dataset()
    garbled = dataset()
    for y in garbled.train.y:
        y[:BURN] = 100.0
    for name, burn, data in [("a", BURN, ds), ("b", BURN, garbled), ("c", 0, ds), ("d", 0, garbled)]:
        train(tiny_config(settings(burn_in_chunks=burn)), data, tmp_path / name, progress=False)
    wa, wb, wc, wd = (weights(tmp_path / n) for n in "abcd")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wc[k], wd[k]) for k in wc)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # burn-in changed training at all


def test_max_steps_is_the_number_of_optimiser_steps(tmp_path, monkeypatch):
    ds = dataset()
    steps, real_step = [], torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    # 3 segments x 9 windows of 8 chunks (stride 4 over 40 chunks) / batch 4 = 7 steps an epoch
    train(tiny_config(settings(max_steps=10, epochs=50)), ds, tmp_path / "a", progress=False)
    assert len(steps) == 10
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2  # 7 + 3 steps; validated after each
    steps.clear()
    train(tiny_config(settings(epochs=2)), ds, tmp_path / "b", progress=False)
    assert len(steps) == 14  # max_steps 0: whole epochs


def test_no_decay_ssm_exempts_dynamics_biases_and_norms(tmp_path):
    model = build_model(hiss_config("s4d", "mamba"))
    decay, keep = param_groups(model, 0.1, no_decay_ssm=True)
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    kept = {id(p) for p in keep["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in kept}
    for n in ("low.blocks.0.mixer.log_A_real", "low.blocks.0.mixer.A_imag", "low.blocks.0.mixer.log_dt",
              "low.blocks.0.mixer.D", "high.blocks.0.mixer.A_log", "high.blocks.0.mixer.D",
              "high.blocks.0.mixer.dt_proj.bias", "low.blocks.0.norm.weight", "head.bias", "high.norm_f.weight"):
        assert n in names, n
    for n in ("low.blocks.0.mixer.C", "low.blocks.0.mixer.out.weight", "high.blocks.0.mixer.in_proj.weight",
              "high.blocks.0.mixer.dt_proj.weight", "head.weight"):
        assert n not in names, n
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))
    (only,) = param_groups(model, 0.1, no_decay_ssm=False)
    assert only["weight_decay"] == 0.1 and len(only["params"]) == len(list(model.parameters()))

    # The trainer's optimiser really has the two groups (its resume state records them).
    train(tiny_config(settings(epochs=1, no_decay_ssm=True, weight_decay=0.05)), dataset(), tmp_path / "t",
          progress=False)
    with safe_open(str(tmp_path / "t" / STATE_FILE), framework="pt") as f:
        groups = json.loads(f.metadata()["train_state"])["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    tiny = load_checkpoint(tmp_path / "t" / "model.safetensors").model
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in param_groups(tiny, 0.05, True)]


def test_ema_saves_the_moving_average_of_the_trained_weights_and_resumes_it(tmp_path, monkeypatch):
    """train.ema_decay: the checkpoint holds e_k = d e_(k-1) + (1 - d) w_k over the weights w_k after
    each optimiser step (e_1 = w_1), validated and selected as such; the trained weights are those of a
    run without it; an interrupted run resumes the average where it was."""
    import hiss_ros.train.loop as loop

    d, ds = 0.8, dataset()
    built, after_step = [], []
    real_build, real_step, real_evaluate = loop.build_model, torch.optim.AdamW.step, loop.evaluate

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        after_step.append({k: v.detach().clone() for k, v in built[-1].state_dict().items()})
        return out

    monkeypatch.setattr(loop, "build_model", lambda c: built.append(real_build(c)) or built[-1])
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(tiny_config(settings(epochs=1, ema_decay=d)), ds, tmp_path / "ema", progress=False)
    assert len(after_step) == 7  # 3 segments x 9 windows / batch 4
    ema = after_step[0]
    for w in after_step[1:]:
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
    saved, last = weights(tmp_path / "ema"), after_step[-1]
    assert all(torch.allclose(saved[k], ema[k], atol=1e-6) for k in saved)
    assert any(not torch.allclose(saved[k], last[k], atol=1e-3) for k in saved)  # not the last weights
    val = json.loads((tmp_path / "ema" / "metrics.json").read_text())["val_mse"]
    assert val == pytest.approx(real_evaluate(load_checkpoint(tmp_path / "ema" / "model.safetensors").model,
                                              ds.val)[0], rel=1e-6)
    after_step.clear()
    train(tiny_config(settings(epochs=1)), ds, tmp_path / "plain", progress=False)
    assert all(torch.equal(after_step[-1][k], last[k]) for k in last)  # the average does not steer training

    # Interrupted in the second epoch's validation, then resumed: the same average as straight through.
    train(tiny_config(settings(epochs=3, ema_decay=d, patience=5)), ds, tmp_path / "straight", progress=False)
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(loop, "evaluate", interrupted)
    cfg = tiny_config(settings(epochs=3, ema_decay=d, patience=5))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, ds, tmp_path / "split", progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    train(cfg, ds, tmp_path / "split", resume=True, progress=False)
    averages = []
    for run in ("straight", "split"):
        with safe_open(str(tmp_path / run / STATE_FILE), framework="pt") as f:
            averages.append({k: f.get_tensor(k) for k in f.keys() if k.startswith("ema.")})
    assert len(averages[0]) > 2 and averages[0].keys() == averages[1].keys()
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])


def test_scaled_deltas_are_fitted_saved_and_stream_like_offline(tmp_path):
    ds = dataset()
    train(tiny_config(settings(epochs=1), scale_deltas=True), ds, tmp_path / "s", progress=False)
    ckpt = load_checkpoint(tmp_path / "s" / "model.safetensors")
    fitted = delta_std(ds.train)
    assert not np.allclose(fitted, 1.0)
    np.testing.assert_allclose(ckpt.model.delta_std.numpy(), fitted, rtol=1e-6)
    # The delta channels of the training inputs have unit spread.
    segments = [torch.from_numpy(s.reshape(1, -1, 9)) for s in ds.train.x]
    deltas = torch.cat([ckpt.model._features(x, x[:, 0])[0, :, 9:] for x in segments])
    np.testing.assert_allclose(deltas.std(0).numpy(), 1.0, rtol=0.05)
    model = ckpt.model.double()
    xs = torch.randn(1, 12 * CHUNK, 9, dtype=torch.float64)
    with torch.no_grad():
        offline = model(xs)
        state, online = model.init_state(1), []
        for k in range(12):
            y, state = model.step_chunk(xs[:, k * CHUNK:(k + 1) * CHUNK], state)
            online.append(y)
    torch.testing.assert_close(torch.stack(online, 1), offline, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="scale_deltas false"):
        build_model(hiss_config("s4d", "mamba")).set_delta_std(torch.ones(6))


def test_mean_pooling_averages_the_chunk_and_is_outside_the_fast_step():
    last = build_model(hiss_config("s4d", "mamba")).double().eval()
    mean = build_model({**hiss_config("s4d", "mamba"), "pool": "mean"}).double().eval()
    mean.load_state_dict(last.state_dict())
    x = torch.randn(1, 3 * CHUNK, 6, dtype=torch.float64)
    with torch.no_grad():
        low = last.low(last._features(x, x[:, 0]).reshape(3, CHUNK, 12))  # (3, CHUNK, D)
        torch.testing.assert_close(mean._chunk_features(last._features(x, x[:, 0])), low.mean(1).unsqueeze(0))
        x2 = x.clone()
        x2[:, 0] += 3.0  # the first sample of chunk 0: read by the mean, not by the last sample alone
        assert (mean(x2)[:, 0] - mean(x)[:, 0]).abs().max() > 1e-6
    assert StepRunner.uncovered(mean.config) == "it covers pool 'last' only; this model has pool 'mean'"
    assert StepRunner.uncovered(last.config) is None
    runner = StepRunner(mean)
    with torch.no_grad():
        assert not runner.applies() and StepRunner(last).applies()
        state, online = mean.init_state(1), []
        for k in range(3):  # the module path, through the runner
            y, state = runner.step(x[:, k * CHUNK:(k + 1) * CHUNK], state)
            online.append(y)
        torch.testing.assert_close(torch.stack(online, 1), mean(x), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="pool 'last' only"):
        runner.set_backend("compile")


@pytest.mark.parametrize("kw, message", [
    ({"burn_in_chunks": -1}, "train.burn_in_chunks = -1: expected an int >= 0"),
    ({"burn_in_chunks": 8}, "train.burn_in_chunks = 8: expected fewer than train.seq_chunks = 8"),
    ({"max_steps": 2.5}, "train.max_steps = 2.5: expected an int >= 0"),
    ({"no_decay_ssm": 1}, "train.no_decay_ssm = 1: expected true or false"),
    ({"weight_decay": -0.1}, "train.weight_decay = -0.1: expected a number >= 0"),
    ({"ema_decay": 1.0}, r"train.ema_decay = 1.0: expected a number in \[0, 1\) \(0: off\)"),
])
def test_recipe_settings_are_validated(kw, message):
    with pytest.raises(ConfigError, match=message):
        settings(**kw)


@pytest.mark.parametrize("patch, message", [
    ({"pool": "max"}, r"hiss.pool = 'max': expected one of \['last', 'mean'\]"),
    ({"scale_deltas": "yes"}, "hiss.scale_deltas = 'yes': expected true or false"),
    ({"deltas": False, "scale_deltas": True}, "hiss.scale_deltas = True: expected false when deltas is false"),
])
def test_recipe_model_options_are_validated(patch, message):
    with pytest.raises(ConfigError, match=message):
        build_model({**hiss_config("s4d", "mamba"), **patch})


def test_the_config_templates_state_the_default_recipe():
    """config/train.yaml and hiss-sim's config (what users copy) set exactly the TrainSettings
    defaults for every train key they write, so a changed default cannot leave them behind."""
    defaults = TrainSettings()
    template = (Path(__file__).resolve().parents[1] / "config" / "train.yaml").read_text()
    for text in (template, TRAIN_YAML):
        train = yaml.safe_load(text)["train"]
        assert {"lr", "weight_decay", "epochs"} <= set(train)
        assert {k: getattr(defaults, k) for k in train} == train


def test_the_shipped_models_configs_state_their_whole_optimiser_recipe():
    """Each config that builds a shipped model (tools/build_shipped_models.py) writes its lr, weight
    decay, epochs and patience out, so a changed TrainSettings default cannot change a shipped
    model's recipe unseen (the default weight decay moved from 0.01 to 0.0328 once)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "build_shipped_models.py"
    spec = importlib.util.spec_from_file_location("build_shipped_models", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert len(build.SHIPPED) == 4
    for name, shipped in build.SHIPPED.items():
        train = yaml.safe_load(shipped["config"].read_text())["train"]
        assert {"lr", "weight_decay", "epochs", "patience", "batch_size", "seq_chunks"} <= set(train), name
