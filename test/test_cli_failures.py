"""Expected failures of hiss-train, hiss-eval, hiss-import and hiss-sim: one line on stderr, exit
status 2, and no partial output a later run would trust (issue #12)."""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import hiss_ros.train.loop as loop
from hiss_ros.data.write import imu, wrench, write_bag
from hiss_ros.importers.cli import main as import_main
from hiss_ros.sim.cli import main as sim_main
from hiss_ros.train.cli import main as train_main
from hiss_ros.train.evaluate import main as eval_main

MS = 1_000_000
SIM = ["--seconds", "0.5", "--quiet"]


def imu_wrench_bag(path: Path, seconds: float = 12.0, accel=None, force=None) -> Path:
    """IMU at 200 Hz and a ground-truth wrench at 100 Hz whose force is a leaky integral of the
    acceleration; ``accel(a)`` / ``force(f)`` edit the (n, 3) arrays before writing."""
    t = np.arange(int(seconds * 200)) / 200
    a = np.stack([np.sin(1.3 * t), np.cos(0.7 * t), np.sin(0.4 * t + 1)], 1)
    f = np.cumsum(a, 0) * 0.01
    a, f = (accel or (lambda v: v))(a), (force or (lambda v: v))(f)
    recs = []
    for i in range(len(t)):
        s = 1_000 * MS + i * 5 * MS
        recs.append(("/imu/data", s, imu(s, (0.0, 0.0, 0.0), a[i])))
        if i % 2 == 0:
            recs.append(("/wrench_gt", s + MS, wrench(s, f[i], (0.0, 0.0, 0.0))))
    return write_bag(path, recs)


def train_config(folder: Path, **model_low) -> Path:
    cfg = yaml.safe_load(open("config/train.yaml"))
    cfg["inputs"] = cfg["inputs"][:1]  # the IMU
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1, **model_low},
                    "high": {"kind": "s4d", "d_model": 8, "n_layers": 1}}
    cfg["train"] = {"epochs": 3, "batch_size": 8, "seq_chunks": 8, "val_fraction": 0.25}
    path = folder / f"train{len(model_low)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    imu_wrench_bag(folder / "bag")
    train_config(folder)
    return folder


@pytest.fixture(scope="module")
def trained(work) -> Path:
    assert train(work, work / "model") == 0
    return work / "model"


def train(work: Path, out: Path, *extra: str, bag: Path | None = None, config: Path | None = None) -> int:
    return train_main(["--config", str(config or work / "train0.yaml"), "--bag", str(bag or work / "bag"),
                       "--out", str(out), "--quiet", "--cache-dir", str(out.parent / "cache"), *extra])


def evaluate(model: Path, out: Path, bag: Path) -> int:
    return eval_main(["--model", str(model), "--bag", str(bag), "--out", str(out), "--quiet", "--cache-dir",
                      str(out.parent / "cache")])


def euroc_csvs(folder: Path) -> tuple[Path, Path]:
    """A 2 s EuRoC-format IMU CSV and a ground-truth CSV of a pose moving along x."""
    t = 1_000 * MS + np.arange(400) * 5 * MS
    imu_rows = [f"{s},0,0,0,0,0,9.81" for s in t]
    gt_rows = [f"{s},{0.1 * k / 200},0,0,1,0,0,0" for k, s in enumerate(t)]
    paths = folder / "imu.csv", folder / "gt.csv"
    for p, rows in zip(paths, (imu_rows, gt_rows), strict=True):
        p.write_text("#header\n" + "\n".join(rows) + "\n")
    return paths


def one_line(capsys, prog: str, *needles: str) -> str:
    """The error line on stderr, checked to be the only line, free of a traceback, holding ``needles``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary folders of staged output still lying around."""
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


# --- bad input: config, bag, checkpoint ---------------------------------------------------------

def test_bad_config_bag_and_checkpoint_end_in_one_line(work, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((work / "train0.yaml").read_text()), "train": {"epochs": 0}}))
    assert train(work, tmp_path / "a", config=bad) == 2
    one_line(capsys, "hiss-train", "train.epochs = 0")
    (tmp_path / "sim.yaml").write_text("seconds: 1\nwings: 2\n")
    assert sim_main(["--out", str(tmp_path / "b"), "--config", str(tmp_path / "sim.yaml"), *SIM]) == 2
    one_line(capsys, "hiss-sim", "wings")

    truncated = tmp_path / "cut.mcap"
    whole = next((work / "bag").glob("*.mcap")).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    assert train(work, tmp_path / "c", bag=truncated) == 2
    one_line(capsys, "hiss-train", str(truncated), "cannot read bag")

    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert evaluate(garbage, tmp_path / "d", work / "bag") == 2
    one_line(capsys, "hiss-eval", str(garbage))
    assert import_main(["euroc", "--imu", str(tmp_path / "no.csv"), "--groundtruth", str(tmp_path / "no.csv"),
                        "--out", str(tmp_path / "e")]) == 2
    one_line(capsys, "hiss-import", "no.csv")
    assert not any((tmp_path / x).exists() for x in "abcde")


# --- file system: output is a file, lies under a file, is read-only, disk full -----------------

def outputs(work: Path, trained: Path, tmp_path: Path) -> dict:
    """For each CLI: a function running it into a given output path."""
    imu_csv, gt_csv = euroc_csvs(tmp_path)
    return {
        "hiss-train": lambda out, *extra: train(work, out, *extra),
        "hiss-eval": lambda out: evaluate(trained, out, work / "bag"),
        "hiss-sim": lambda out, *extra: sim_main(["--out", str(out), *SIM, *extra]),
        "hiss-import": lambda out, *extra: import_main(["euroc", "--imu", str(imu_csv), "--groundtruth", str(gt_csv),
                                                        "--out", str(out), "--no-progress", *extra]),
    }


@pytest.mark.parametrize("prog", ["hiss-train", "hiss-eval", "hiss-sim", "hiss-import"])
def test_output_that_is_a_file_or_lies_under_one(work, trained, tmp_path, capsys, prog):
    run = outputs(work, trained, tmp_path)[prog]
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    assert run(blocker / "sub" / "out") == 2
    one_line(capsys, prog, str(blocker), "not a folder")
    assert run(blocker) == 2
    one_line(capsys, prog, str(blocker))
    assert blocker.read_text() == "mine" and not leftovers(tmp_path)


def deny_writes(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: chmod where that binds (not for root), else refuse every open
    for writing, file creation and folder creation below it, as a read-only mount would."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    def refuse(path, writing: bool) -> None:
        if writing and str(Path(path).absolute()).startswith(str(folder.absolute())):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            refuse(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        refuse(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        refuse(path, True)
        return real_mkdir(path, *args, **kwargs)

    for target, name, fake in ((builtins, "open", fake_open), (io, "open", fake_open), (os, "open", fake_os_open),
                               (os, "mkdir", fake_mkdir)):
        monkeypatch.setattr(target, name, fake)


@pytest.mark.parametrize("prog", ["hiss-train", "hiss-eval", "hiss-sim", "hiss-import"])
def test_read_only_output_folder(work, trained, tmp_path, capsys, monkeypatch, prog):
    run = outputs(work, trained, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    assert run[prog](locked / "out") == 2
    one_line(capsys, prog, str(locked), "permission denied", "writable")
    monkeypatch.undo()
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_training_leaves_no_finished_looking_run(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "atomic_write", no_space)  # the train state after the first epoch
    assert train(work, tmp_path / "run") == 2
    one_line(capsys, "hiss-train", str(tmp_path / "run"), "no space left", "free some space")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_disk_full_while_evaluating_leaves_nothing(work, trained, tmp_path, capsys, monkeypatch):
    import hiss_ros.train.evaluate as ev

    def half_written(evaluation, out):
        (out / "predictions.png").write_bytes(b"\x89PNG")
        no_space()

    monkeypatch.setattr(ev, "_plots", half_written)
    assert evaluate(trained, tmp_path / "ev", work / "bag") == 2
    one_line(capsys, "hiss-eval", str(tmp_path / "ev"), "no space left")
    assert not (tmp_path / "ev").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("prog, module", [("hiss-sim", "hiss_ros.sim.bag"),
                                          ("hiss-import", "hiss_ros.importers.common")])
def test_disk_full_while_writing_a_bag_leaves_no_bag_and_keeps_the_old_one(work, trained, tmp_path, capsys,
                                                                          monkeypatch, prog, module):
    run = outputs(work, trained, tmp_path)[prog]
    real = importlib.import_module(module).write_bag

    def half_written(path, records, **kwargs):
        real(path, (r for _, r in zip(range(50), records, strict=False)), **kwargs)
        no_space()

    monkeypatch.setattr(f"{module}.write_bag", half_written)
    assert run(tmp_path / "bag") == 2
    one_line(capsys, prog, "no space left")
    assert not (tmp_path / "bag").exists() and not leftovers(tmp_path)
    monkeypatch.undo()
    assert run(tmp_path / "bag") == 0
    before = sorted(p.name for p in (tmp_path / "bag").iterdir())
    monkeypatch.setattr(f"{module}.write_bag", half_written)
    assert run(tmp_path / "bag", "--force") == 2
    assert sorted(p.name for p in (tmp_path / "bag").iterdir()) == before  # the old bag survived


# --- bag cache ------------------------------------------------------------------------------------

def test_read_only_cache_folder_warns_and_trains(work, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    deny_writes(monkeypatch, cache)
    with caplog.at_level(logging.WARNING):
        assert train(work, tmp_path / "run") == 0
    assert "not caching the bag arrays" in caplog.text and str(cache) in caplog.text
    assert (tmp_path / "run" / "metrics.json").is_file()
    monkeypatch.undo()
    cache.chmod(0o755)
    assert list(cache.iterdir()) == []


# --- ground truth and inputs -----------------------------------------------------------------------

def test_nonfinite_ground_truth_samples_are_dropped_and_counted(work, tmp_path, caplog):
    def holes(f):
        f[100:140, 1] = np.nan
        f[300, 2] = np.inf
        return f

    bag = imu_wrench_bag(tmp_path / "holes", force=holes)
    with caplog.at_level(logging.WARNING):
        assert train(work, tmp_path / "run", bag=bag) == 0
    assert "/wrench_gt: 21 non-finite sample(s) of 1200 dropped" in caplog.text
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["val_mse"])


def test_ground_truth_without_a_finite_sample_is_named(work, tmp_path, capsys):
    def gone(f):
        f[:, 0] = np.nan
        return f

    bag = imu_wrench_bag(tmp_path / "gone", force=gone)
    assert train(work, tmp_path / "run", bag=bag) == 2
    one_line(capsys, "hiss-train", "/wrench_gt: 1200 of 1200 samples non-finite", "wrench.force.x 1200")
    assert not (tmp_path / "run").exists()


def test_input_channel_all_nan_is_named_with_its_count(work, tmp_path, capsys):
    def dead(a):
        a[:, 0] = np.nan
        return a

    bag = imu_wrench_bag(tmp_path / "dead", accel=dead)
    assert train(work, tmp_path / "run", bag=bag) == 2
    line = one_line(capsys, "hiss-train", "/imu/data: 2400 of 2400 samples non-finite", "linear_acceleration.x 2400")
    assert "shorter than one training sequence" not in line


def test_huge_ground_truth_is_refused_and_never_written_as_infinity(work, trained, tmp_path, capsys):
    def huge(f):  # in the training part of the recording, and in its validation part
        f[200:210, 1] = f[-300:-290, 1] = 1e300
        return f

    bag = imu_wrench_bag(tmp_path / "huge", force=huge)
    assert train(work, tmp_path / "run", bag=bag) == 2
    one_line(capsys, "hiss-train", "/wrench_gt:wrench.force.y", "too large")
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert evaluate(trained, tmp_path / "ev", bag) == 2  # the bag's ground truth against a sane model
    one_line(capsys, "hiss-eval", "not finite", "mse./wrench_gt:wrench.force.y")
    assert not (tmp_path / "ev").exists() and not leftovers(tmp_path)


# --- resume ----------------------------------------------------------------------------------------

def test_resume_with_another_config_is_refused(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(work, out, "--resume") == 0
    wider = train_config(tmp_path, d_model=12)
    assert train(work, out, "--resume", config=wider) == 2
    one_line(capsys, "hiss-train", str(out), "model.low.d_model: 8 -> 12", "another --out")
    assert (out / "metrics.json").is_file()  # the finished run is left as it was


def test_resume_with_other_bags_is_refused(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(work, out, "--resume") == 0
    other = imu_wrench_bag(tmp_path / "other", seconds=10.0)
    assert train(work, out, "--resume", bag=other) == 2
    one_line(capsys, "hiss-train", str(out), "trained on other data", "another --out")
    assert train(work, out, "--resume") == 0  # its own bags: resumed (here: finished already)


def test_a_fresh_run_leaves_no_earlier_state_to_resume(work, tmp_path, monkeypatch):
    """A run started without --resume and stopped in its first epoch: a later --resume starts it
    afresh, not from the earlier run that used the folder."""
    out = tmp_path / "run"
    assert train(work, out) == 0 and (out / loop.STATE_FILE).is_file()

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "fit_epoch", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(work, out)
    assert not (out / loop.STATE_FILE).exists() and not (out / "metrics.json").exists()


def test_crash_between_metrics_row_and_train_state_does_not_repeat_a_row(work, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = loop._save_state, []

    def killed(*args):  # the process dies after epoch 1's row, before its train state
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*args)

    monkeypatch.setattr(loop, "_save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(work, out)
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header, epochs 0 and 1
    monkeypatch.undo()
    assert train(work, out, "--resume") == 0
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    seconds = [float(r[-1]) for r in rows]
    assert seconds == sorted(seconds)  # cumulative across the resume
    assert json.loads((out / "metrics.json").read_text())["seconds"] >= seconds[-1]


# --- settings that used to pass and break training, or end in a traceback ----------------------

@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["train"].update(grad_clip=-1.0), "train.grad_clip = -1.0"),
    (lambda c: c["train"].update(grad_clip=0), "train.grad_clip = 0"),
    (lambda c: c["train"].update(lr=float("nan")), "train.lr = nan"),
    (lambda c: c["train"].update(weight_decay=float("inf")), "train.weight_decay = inf"),
    (lambda c: c["train"].update(seed=2 * 10**14), "train.seed = 200000000000000"),
    (lambda c: c["train"].update(epoch=3), "unknown key(s) ['epoch']"),
    (lambda c: c.update(input_rate_hz="fast"), "input_rate_hz = 'fast'"),
    (lambda c: c.update(filter="lowpass"), "filter = 'lowpass'"),
    (lambda c: c.update({1: "x"}), "unknown key(s) ['1']"),
    (lambda c: c.update(strapdown={"gyro": "/imu/data:angular_velocity"}), "strapdown: expected the keys gyro, accel"),
])
def test_settings_that_cannot_train_are_refused_by_name(work, tmp_path, capsys, edit, needle):
    cfg = yaml.safe_load((work / "train0.yaml").read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train(work, tmp_path / "out", config=path) == 2
    one_line(capsys, "hiss-train", needle)
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_text_and_an_empty_or_misspelt_compare_list_are_refused(work, trained, tmp_path, capsys):
    assert train(work, tmp_path / "a", config=trained / "model.safetensors") == 2  # --config / --model mixed up
    one_line(capsys, "hiss-train", "not a text (UTF-8) YAML file")
    assert train(work, tmp_path / "b", "--compare", "") == 2
    one_line(capsys, "hiss-train", "--compare ''")
    assert train(work, tmp_path / "c", "--compare", "flat-lsmt") == 2  # a typo, not a missing 'hiss'
    one_line(capsys, "hiss-train", "unknown model 'flat-lsmt'", "flat-lstm")


def test_diverged_training_is_an_error_not_an_earlier_runs_model(work, trained, tmp_path, capsys, monkeypatch):
    """A run whose validation error is never finite once reported the model file already in --out
    (another run's) with exit status 0."""
    out = tmp_path / "reused"
    import shutil
    shutil.copytree(trained, out)
    (out / "metrics.json").unlink()
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (float("nan"), None))
    assert train(work, out) == 2
    one_line(capsys, "hiss-train", "training diverged in epoch 1", "lower train.lr")
    assert not (out / "metrics.json").exists()


def test_a_local_folder_named_like_a_shipped_model_is_the_users(trained, tmp_path, monkeypatch):
    from hiss_ros.serving import load_model
    from hiss_ros.shipped import shipped_model

    monkeypatch.chdir(tmp_path)
    assert shipped_model("contact").parent.name == "models"  # nothing here by that name: the shipped one
    import shutil
    shutil.copytree(trained, tmp_path / "contact")
    assert shipped_model("contact") == Path("contact")
    assert load_model("contact").path == str(Path("contact") / "model.safetensors")
    assert shipped_model("run1") == Path("run1")  # neither: the error names what the user typed


def test_importer_refuses_non_finite_excerpts(tmp_path, capsys):
    imu_csv, gt_csv = euroc_csvs(tmp_path)
    for opt in (["--duration", "inf"], ["--start", "nan"]):
        assert import_main(["euroc", "--imu", str(imu_csv), "--groundtruth", str(gt_csv), "--out",
                            str(tmp_path / "out"), "--no-progress", *opt]) == 2
        one_line(capsys, "hiss-import", "--start must be >= 0")


def test_evaluating_into_a_training_run_folder_is_refused(work, trained, tmp_path, capsys):
    """hiss-eval --out <the run folder> would replace the training's metrics.json with its own."""
    import shutil

    run = shutil.copytree(trained, tmp_path / "run")
    before = (run / "metrics.json").read_bytes()
    assert evaluate(run, run, work / "bag") == 2
    one_line(capsys, "hiss-eval", "holds a trained model", str(run / "eval"))
    assert (run / "metrics.json").read_bytes() == before
    assert evaluate(run, run / "eval", work / "bag") == 0 and (run / "eval" / "metrics.json").is_file()
