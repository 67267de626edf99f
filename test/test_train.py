"""hiss-train end to end on bags written into tmp_path: learning, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.data.synthetic import contact_bag
from hiss_ros.train.cli import main
from hiss_ros.train.compare import tune_candidates
from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.evaluate import main as eval_main


def config(tmp_path, **train):
    cfg = yaml.safe_load(open("config/train.yaml"))
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 16, "n_layers": 1, "dropout": 0.0},
                    "high": {"kind": "mamba", "d_model": 16, "n_layers": 1, "dropout": 0.0}}
    cfg["train"] = {"epochs": 8, "batch_size": 8, "lr": 3e-3, "seq_chunks": 32, "val_fraction": 0.25, "seed": 1,
                    **train}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return contact_bag(tmp_path_factory.mktemp("bags") / "contact")


def run(tmp_path, bag, out, *extra, **train):
    return main(["--config", str(config(tmp_path, **train)), "--bag", str(bag), "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache"), *extra])


def test_trains_a_model_that_beats_the_mean_and_serves_from_its_checkpoint(tmp_path, bag):
    assert run(tmp_path, bag, tmp_path / "run", epochs=25) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Predicting the training mean scores about 1.0 on normalised targets.
    assert metrics["val_mse"] < 0.25, metrics
    assert set(metrics["val_mse_per_channel"]) == {f"/wrench_gt:wrench.force.{a}" for a in "xyz"}
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert ckpt.data["inputs"][1]["topic"] == "/tactile"
    assert ckpt.config.chunk == 10 and ckpt.config.input_dim == 9 and ckpt.config.output_dim == 3
    assert len(ckpt.normalization["input_mean"]) == 9
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_mse") and len(rows) == 1 + metrics["epochs_run"]
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard is in "test"

    # hiss-eval on the same bag reproduces the trainer's validation metrics, and writes its report.
    assert eval_main(["--model", str(tmp_path / "run"), "--bag", str(bag), "--out", str(tmp_path / "ev"),
                      "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["val_mse"] == pytest.approx(metrics["val_mse"], rel=1e-6)
    for ch, mse in metrics["val_mse_per_channel"].items():
        assert ev["mse"][ch] == pytest.approx(mse, rel=1e-5)
    lines = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["stamp_ns", "pred /wrench_gt:wrench.force.x"]
    assert len(lines) == 1 + metrics["val_chunks"]
    for png in ("predictions.png", "errors.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reaches_the_same_result(tmp_path, bag, monkeypatch):
    assert run(tmp_path, bag, tmp_path / "straight", epochs=4) == 0
    import hiss_ros.train.loop as loop

    real_evaluate, calls = loop.evaluate, []

    def interrupted(*args):  # Ctrl-C during the third epoch's validation
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(loop, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, bag, tmp_path / "split", epochs=4)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert run(tmp_path, bag, tmp_path / "split", "--resume", epochs=4) == 0
    a = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    b = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    strip = [[r.rsplit(",", 1)[0] for r in rows] for rows in (a, b)]  # the last column is wall time
    assert strip[0] == strip[1]
    wa = load_checkpoint(tmp_path / "straight" / "model.safetensors").model.state_dict()
    wb = load_checkpoint(tmp_path / "split" / "model.safetensors").model.state_dict()
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def test_resume_of_a_run_that_stopped_early_trains_no_more_epochs(tmp_path, bag, monkeypatch):
    import hiss_ros.train.loop as loop

    real_finish = loop._finish

    def interrupted(*args, **kwargs):  # Ctrl-C after the stopping epoch's state, before metrics.json
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, bag, tmp_path / "o", epochs=16, patience=1, lr=0.1)
    monkeypatch.setattr(loop, "_finish", real_finish)
    rows = (tmp_path / "o" / "metrics.csv").read_text().splitlines()
    assert len(rows) - 1 < 16  # it did stop early
    for _ in range(2):  # the interrupted run, then the finished one
        assert run(tmp_path, bag, tmp_path / "o", "--resume", epochs=16, patience=1, lr=0.1) == 0
        assert (tmp_path / "o" / "metrics.csv").read_text().splitlines() == rows
        assert json.loads((tmp_path / "o" / "metrics.json").read_text())["epochs_run"] == len(rows) - 1


def test_eval_of_a_model_validated_on_val_bags_reproduces_its_val_mse(tmp_path, bag):
    held_out = contact_bag(tmp_path / "held_out", seconds=20.0, seed=1)
    assert run(tmp_path, bag, tmp_path / "run", "--val-bag", str(held_out), epochs=2) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").data["whole_val_bags"] is True
    assert eval_main(["--model", str(tmp_path / "run"), "--bag", str(held_out), "--out", str(tmp_path / "ev"),
                      "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["chunks"] == metrics["val_chunks"]
    assert ev["val_mse"] == pytest.approx(metrics["val_mse"], rel=1e-6)


def test_missing_topic_is_a_clear_error_without_traceback(tmp_path, bag, capsys):
    cfg = yaml.safe_load(config(tmp_path).read_text())
    cfg["inputs"][0]["topic"] = "/imu/raw"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["--config", str(tmp_path / "bad.yaml"), "--bag", str(bag), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no topic '/imu/raw'; the bag has: /imu/data [sensor_msgs/msg/Imu]" in err
    assert "Traceback" not in err


def test_too_short_recordings_are_reported_and_nothing_is_trained(tmp_path, capsys):
    short = contact_bag(tmp_path / "short", seconds=2.0)  # 40 chunks: 30 train < 32 per sequence
    code = run(tmp_path, short, tmp_path / "o")
    assert code == 2
    assert "no training data" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("edit, message", [
    ({"train": {"epochs": 0}}, "train.epochs = 0: expected a positive int"),
    ({"output_rate_hz": 30}, "must be a whole number"),
    ({"inputs": []}, "inputs must be a non-empty list"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_config_errors(tmp_path, bag, capsys, edit, message):
    cfg = {**yaml.safe_load(config(tmp_path).read_text()), **edit}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "bad.yaml"), "--bag", str(bag), "--out", str(tmp_path / "o")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_two_process_ddp_matches_one_process(tmp_path, bag):
    """torchrun with 2 CPU processes (gloo) ends with the same metrics as 1 process."""
    cfg = config(tmp_path, epochs=3)
    common = ["--config", str(cfg), "--bag", str(bag), "--quiet", "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hiss_ros.train.cli", *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)  # really data-parallel
    assert two["epochs_run"] == one["epochs_run"] == 3
    assert two["val_mse"] == pytest.approx(one["val_mse"], rel=1e-3)
    rows_one = [r.split(",")[1:3] for r in (tmp_path / "one" / "metrics.csv").read_text().splitlines()[1:]]
    rows_two = [r.split(",")[1:3] for r in (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1:]]
    for a, b in zip(rows_one, rows_two, strict=True):  # train loss and val_mse per epoch
        assert [float(v) for v in b] == pytest.approx([float(v) for v in a], rel=1e-3)


def test_compare_trains_each_model_at_the_hiss_budget(tmp_path, bag):
    out = tmp_path / "cmp"
    code = main(["--config", str(config(tmp_path, epochs=2)), "--bag", str(bag), "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache"), "--compare", "hiss,flat-mamba,flat-lstm"])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in rows] == ["hiss", "flat-mamba", "flat-lstm"]
    for r in rows:
        assert abs(r["budget_ratio"] - 1) <= 0.1, r
        assert r["step_ms"] > 0 and np.isfinite(r["val_mse"])
        assert (out / r["name"] / "model.safetensors").is_file()
    assert "| flat-lstm |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # --resume keeps the finished models (an interrupted comparison continues, it does not restart)
    def weights(name):
        return load_checkpoint(out / name / "model.safetensors").model.state_dict()

    before = {r["name"]: weights(r["name"]) for r in rows}
    stamp = (out / "hiss" / "metrics.json").stat().st_mtime_ns
    (out / "flat-lstm" / "metrics.json").unlink()  # as if interrupted during its last epoch
    (out / "comparison.json").unlink()
    code = main(["--config", str(config(tmp_path, epochs=2)), "--bag", str(bag), "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache"), "--compare", "hiss,flat-mamba,flat-lstm", "--resume"])
    assert code == 0 and [r["name"] for r in json.loads((out / "comparison.json").read_text())] == [
        "hiss", "flat-mamba", "flat-lstm"]
    assert (out / "hiss" / "metrics.json").stat().st_mtime_ns == stamp  # kept, not retrained
    for name, state in before.items():  # kept, or resumed to the same end
        assert all(torch.equal(v, weights(name)[k]) for k, v in state.items()), name


def test_chunk_sweep_trains_one_model_per_chunk(tmp_path, bag):
    out = tmp_path / "sweep"
    code = main(["--config", str(config(tmp_path, epochs=1, seq_chunks=16)), "--bag", str(bag), "--out", str(out),
                 "--quiet", "--cache-dir", str(tmp_path / "cache"), "--sweep", "chunk=5,20"])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["chunk"], r["output_rate_hz"]) for r in rows] == [(5, 40.0), (20, 10.0)]
    assert load_checkpoint(out / "chunk_20" / "model.safetensors").config.chunk == 20
    assert main(["--config", str(config(tmp_path)), "--bag", str(bag), "--out", str(out), "--sweep", "width=3"]) == 2


def test_chunk_sweep_with_compare_retrains_the_flat_baselines_at_each_rate(tmp_path, bag):
    out = tmp_path / "sweep"
    code = main(["--config", str(config(tmp_path, epochs=1, seq_chunks=16)), "--bag", str(bag), "--out", str(out),
                 "--quiet", "--cache-dir", str(tmp_path / "cache"), "--sweep", "chunk=5,20", "--compare",
                 "hiss,flat-lstm"])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["name"], r["chunk"]) for r in rows] == [
        ("hiss, chunk 5", 5), ("flat-lstm, chunk 5", 5), ("hiss, chunk 20", 20), ("flat-lstm, chunk 20", 20)]
    for c in (5, 20):
        for name in ("hiss", "flat-lstm"):
            assert load_checkpoint(out / f"chunk_{c}" / name / "model.safetensors").config.chunk == c
        assert (out / f"chunk_{c}" / "comparison.md").is_file()
    assert "| flat-lstm, chunk 20 |" in (out / "comparison.md").read_text()


def test_compare_over_two_seeds_reports_spread_and_the_paired_difference(tmp_path, bag):
    """--seeds: one training per model and seed, mean +- std per model, HiSS paired seed by seed
    with the best flat model; --val-bag validates on its own recording, --test-bag scores held out."""
    other = contact_bag(tmp_path / "other", seconds=20.0, seed=5)
    out = tmp_path / "cmp"
    code = main(["--config", str(config(tmp_path, epochs=1, seq_chunks=16)), "--bag", str(bag), "--out", str(out),
                 "--quiet", "--cache-dir", str(tmp_path / "cache"), "--compare", "hiss,flat-lstm", "--seeds", "0,1",
                 "--val-bag", str(other), "--test-bag", str(other)])
    assert code == 0
    hiss, lstm = json.loads((out / "comparison.json").read_text())
    for row in (hiss, lstm):
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        vals = [r["val_mse"] for r in row["per_seed"]]
        assert vals[0] != vals[1]  # the seed reached the training
        assert row["val_mse"] == pytest.approx(np.mean(vals))
        assert row["val_mse_std"] == pytest.approx(np.std(vals, ddof=1))
        for s in (0, 1):
            assert (out / row["name"] / f"seed_{s}" / "model.safetensors").is_file()
    # The validation recording is the whole of the other bag: its chunks, not a fifth of the training bag's.
    val_chunks = json.loads((out / "hiss" / "seed_0" / "metrics.json").read_text())["val_chunks"]
    assert 20 * 20 - 5 <= val_chunks <= 20 * 20  # 20 s at 20 Hz (the pipeline may drop a partial chunk)
    # Validation and test are the same recording here, scored the same way.
    assert hiss["per_seed"][0]["test_mse"] == pytest.approx(hiss["per_seed"][0]["val_mse"], rel=1e-5)
    verdict = hiss["vs_best_flat"]
    diffs = [a["test_mse"] - b["test_mse"] for a, b in zip(hiss["per_seed"], lstm["per_seed"], strict=True)]
    assert verdict["against"] == "flat-lstm" and verdict["diffs"] == pytest.approx(diffs)
    expected = ("win" if np.mean(diffs) < 0 else "loss") if abs(np.mean(diffs)) > 2 * np.std(diffs, ddof=1) \
        else "no clear difference"
    assert verdict["call"] == expected
    md = (out / "comparison.md").read_text()
    assert f"| hiss | {hiss['val_mse']:.4f} +- {hiss['val_mse_std']:.4f} |" in md and expected in md
    assert main(["--config", str(config(tmp_path)), "--bag", str(bag), "--out", str(out), "--compare", "hiss",
                 "--seeds", "0,0"]) == 2


def test_tune_candidates_are_distinct_and_keep_their_draws():
    """The default recipe is one of the generator's draws: it is not drawn again (a tuning budget
    of 3 trains 3 settings); other configs keep the same list as before."""
    defaults = TrainSettings()
    for lr, wd in [(defaults.lr, defaults.weight_decay), (3e-3, 0.01), (1e-3, 0.01)]:
        c = tune_candidates(4, lr, wd)
        assert c[0] == {"lr": lr, "weight_decay": wd} and len({(x["lr"], x["weight_decay"]) for x in c}) == 4
    assert tune_candidates(3, 3e-3, 0.01)[1:] == [{"lr": 5.3e-4, "weight_decay": 9.85e-4},
                                                 {"lr": 5.52e-3, "weight_decay": 0.0328}]  # docs/ACCURACY.md's runs
    assert tune_candidates(3, defaults.lr, defaults.weight_decay)[1:] == tune_candidates(4, 3e-3, 0.01)[1::2]


def test_tune_gives_every_model_the_same_candidates_and_trains_the_best(tmp_path, bag):
    """--tune 3: the same three (lr, weight decay) settings per model (the config's first), each
    trained with the first seed; the lowest validation MSE is taken, and its run is that seed's."""
    other = contact_bag(tmp_path / "other", seconds=20.0, seed=5)
    out = tmp_path / "cmp"
    args = ["--config", str(config(tmp_path, epochs=1, seq_chunks=16)), "--bag", str(bag), "--out", str(out),
            "--quiet", "--cache-dir", str(tmp_path / "cache"), "--compare", "hiss,flat-lstm", "--seeds", "0,1",
            "--val-bag", str(other), "--tune", "3"]
    assert main(args) == 0
    rows = json.loads((out / "comparison.json").read_text())
    cfg = TrainConfig.load(config(tmp_path, epochs=1, seq_chunks=16))
    candidates = tune_candidates(3, cfg.train.lr, cfg.train.weight_decay)
    assert candidates[0] == {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}
    assert len({(c["lr"], c["weight_decay"]) for c in candidates}) == 3
    for row in rows:
        t = row["tuning"]
        assert [{k: c[k] for k in ("lr", "weight_decay")} for c in t["candidates"]] == candidates
        vals = [c["val_mse"] for c in t["candidates"]]
        assert t["chosen"] == int(np.argmin(vals)) and len(set(vals)) == 3  # the settings reached the training
        for i, c in enumerate(t["candidates"]):
            trial = json.loads((out / row["name"] / f"tune_{i}" / "metrics.json").read_text())
            assert trial["val_mse"] == c["val_mse"]
        assert row["per_seed"][0]["val_mse"] == min(vals)  # seed 0 is the chosen trial
        seed1 = load_checkpoint(out / row["name"] / "seed_1" / "model.safetensors").data["train"]
        assert (seed1["lr"], seed1["weight_decay"], seed1["seed"]) == (t["lr"], t["weight_decay"], 1)
    assert "Tuning of flat-lstm:" in (out / "comparison.md").read_text()
    assert main([*args[:-2], "--tune", "1"]) == 2
    assert main(["--config", str(config(tmp_path)), "--bag", str(bag), "--out", str(tmp_path / "x"),
                 "--tune", "2"]) == 2  # --tune without --compare
