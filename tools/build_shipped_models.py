"""Rebuild the shipped sample bags, the shipped models and their model cards, from scratch.

    .venv/bin/python tools/build_shipped_models.py            # 2-3 hours on 2 CPU cores (estimated; contact about 1 h)

Steps (each is skipped when its output exists, so an interrupted build continues):
1. data: ``hiss-sim`` training recordings (seeds 1-4, 150 s each) and held-out test recordings
   (seeds 5-6, 60 s); ``hiss-import broad`` of the 16 BROAD trials the splits use (``../shared/data/broad``);
   the sample bags in ``data/sample/`` (sim seed 0, 60 s; a 20 s excerpt of BROAD trial 21).
2. ``hiss-train --compare hiss,flat-s4d,flat-mamba,flat-lstm,flat-transformer --resume`` for each model,
   with ``config/train_contact.yaml`` and ``config/train_broad_velocity.yaml`` (BROAD: protocol W of
   docs/ACCURACY.md, independent validation trials 01 and 10); the ``*_uncertainty`` models (variance
   head) train HiSS alone with ``config/train_contact_nll.yaml`` and ``config/train_broad_velocity_nll.yaml``
   (BROAD split as ``broad_velocity``; the variance is calibrated on the validation trials).
3. every compared model evaluated on the held-out test data (``hiss-eval --split all``); the
   HiSS model copied to ``models/<name>.safetensors`` with its sample-bag metrics in
   ``models/<name>.metrics.json`` (what ``test/test_shipped.py`` reproduces);
4. the model cards in ``models/README.md``.
Work files go to ``out/shipped/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from hiss_ros.models import MODEL_CHOICES

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "out" / "shipped"
SAMPLE = REPO / "data" / "sample"
BROAD = REPO.parent / "shared" / "data" / "broad"
COMPARE = list(MODEL_CHOICES)  # every registered model
BROAD_TRAIN = ["01", "04", "06", "08", "10", "14", "15", "18", "24"]  # imported: protocol W's training and validation
BROAD_TEST = ["02", "07", "09", "11", "16", "21", "25"]  # one of each trial group (trials.json) and all of 21

BROAD_W_TRAIN = ["04", "06", "08", "14", "15", "18", "24"]  # protocol W of docs/ACCURACY.md:
BROAD_W_VAL = ["01", "10"]  # independent validation recordings (and where the variance is calibrated)
# Each task's data, shared by its MSE model and its variance-head model.
CONTACT_DATA = {
    "train": [WORK / f"contact_train_{s}" for s in (1, 2, 3, 4)],
    "test": [WORK / f"contact_test_{s}" for s in (5, 6)],
    "sample": SAMPLE / "contact_sim",
}
BROAD_DATA = {
    "train": [WORK / "broad" / t for t in BROAD_W_TRAIN],
    "val": [WORK / "broad" / t for t in BROAD_W_VAL],
    "test": [WORK / "broad" / t for t in BROAD_TEST],
    "sample": SAMPLE / "broad_excerpt",
}
SHIPPED = {
    "contact": {"config": REPO / "config" / "train_contact.yaml", **CONTACT_DATA, "compare": COMPARE},
    "broad_velocity": {"config": REPO / "config" / "train_broad_velocity.yaml", **BROAD_DATA, "compare": COMPARE},
    # The same tasks with the variance head (beta-NLL, novelty inflation): HiSS alone, no comparison.
    "contact_uncertainty": {"config": REPO / "config" / "train_contact_nll.yaml", **CONTACT_DATA, "compare": ["hiss"]},
    "broad_velocity_uncertainty": {"config": REPO / "config" / "train_broad_velocity_nll.yaml", **BROAD_DATA,
                                   "compare": ["hiss"]},
}


def run(main, argv: list[str]) -> None:
    print("$", main.__module__, " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"failed ({code}): {main.__module__} {' '.join(argv)}")


def broad_bag(trial: str) -> Path:
    (path,) = (WORK / "broad").glob(f"{trial}_*")
    return path


def make_data() -> None:
    from hiss_ros.importers.cli import main as import_main
    from hiss_ros.sim.cli import main as sim_main

    for seed, seconds, out in [(1, 150, "contact_train_1"), (2, 150, "contact_train_2"), (3, 150, "contact_train_3"),
                               (4, 150, "contact_train_4"), (5, 60, "contact_test_5"), (6, 60, "contact_test_6")]:
        if not (WORK / out).exists():
            run(sim_main, ["--out", str(WORK / out), "--seconds", str(seconds), "--seed", str(seed), "--zstd",
                           "--quiet"])
    if not (WORK / "broad").exists():
        run(import_main, ["broad", str(BROAD), "--trials", ",".join(BROAD_TRAIN + BROAD_TEST), "--out",
                          str(WORK / "broad"), "--zstd", "--no-mag", "--no-progress"])
    if not (SAMPLE / "contact_sim").exists():
        run(sim_main, ["--out", str(SAMPLE / "contact_sim"), "--seconds", "60", "--seed", "0", "--zstd", "--quiet"])
    if not (SAMPLE / "broad_excerpt").exists():
        run(import_main, ["broad", str(BROAD), "--trials", "21", "--start", "34", "--duration", "20", "--out",
                          str(SAMPLE / "broad_excerpt"), "--zstd", "--no-mag", "--no-progress"])


def train(name: str, spec: dict) -> Path:
    from hiss_ros.train.cli import main as train_main

    out = WORK / name
    if not (out / "comparison.json").exists():
        bags = [str(b if b.exists() else broad_bag(b.name)) for b in spec["train"]]
        val = [str(b if b.exists() else broad_bag(b.name)) for b in spec.get("val", [])]
        run(train_main, ["--config", str(spec["config"]), *(a for b in bags for a in ("--bag", b)),
                         *(a for b in val for a in ("--val-bag", b)), "--out", str(out),
                         "--compare", ",".join(spec["compare"]), "--cache-dir", str(WORK / "cache"), "--quiet",
                         "--resume"])
    return out


def evaluate(name: str, spec: dict, out: Path) -> dict:
    """Held-out test metrics of every compared model; the shipped model and its sample metrics."""
    from hiss_ros.train.evaluate import evaluate_bags, write_report

    test_bags = [b if b.exists() else broad_bag(b.name) for b in spec["test"]]
    from hiss_ros.checkpoint import load_checkpoint
    from hiss_ros.train.compare import step_cost_ms

    rows = json.loads((out / "comparison.json").read_text())
    for row in rows:
        # Measured again after training, all models in one process: comparable with each other.
        row["step_ms"] = round(step_cost_ms(load_checkpoint(out / row["name"] / "model.safetensors").model, 500), 3)
        ev = evaluate_bags(out / row["name"], test_bags, "all", WORK / "cache", progress=False)
        write_report(ev, out / row["name"] / "test")
        row["test_mse"] = ev.metrics["mse_normalised"]
        row["test_rmse"] = ev.metrics["rmse"]
        row["test_chunks"] = ev.metrics["chunks"]
        if row["name"] == "hiss":
            baseline_test = mean_baseline_mse(ev, out / "hiss" / "model.safetensors")
            calibration = ev.metrics.get("calibration")  # the variance head's, held out
            novelty = ev.metrics.get("novelty")
    shipped = REPO / "models" / f"{name}.safetensors"
    shutil.copyfile(out / "hiss" / "model.safetensors", shipped)
    ev = evaluate_bags(shipped, [spec["sample"]], "all", None, progress=False)
    write_report(ev, out / "sample_eval")
    sample = {k: ev.metrics[k] for k in ("mse_normalised", "mse", "rmse", "chunks")}
    sample["bag"] = str(spec["sample"].relative_to(REPO))
    (REPO / "models" / f"{name}.metrics.json").write_text(json.dumps(sample, indent=2) + "\n")
    sample["mean_baseline_mse"] = mean_baseline_mse(ev, shipped)
    train_metrics = json.loads((out / "hiss" / "metrics.json").read_text())
    return {"rows": rows, "sample": sample, "train": train_metrics, "size_mb": shipped.stat().st_size / 1e6,
            "mean_baseline_test_mse": baseline_test, "compare": spec["compare"], "calibration": calibration,
            "novelty": novelty}


def mean_baseline_mse(ev, model: Path) -> float:
    """Normalised MSE of predicting the training mean every time (no model): the scale to read
    the models' MSE against (1.0 when the data looks like the training data)."""
    from hiss_ros.serving import load_model

    return float((load_model(model).spec.normalization.outputs(ev.truth).astype(float) ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SHIPPED), action="append", help="build only this model (repeatable)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tools"))
    from model_cards import write_cards

    WORK.mkdir(parents=True, exist_ok=True)
    make_data()
    results = {}
    for name in args.only or sorted(SHIPPED):
        results[name] = evaluate(name, SHIPPED[name], train(name, SHIPPED[name]))
        (WORK / f"{name}.results.json").write_text(json.dumps(results[name], indent=2))
    write_cards({n: json.loads((WORK / f"{n}.results.json").read_text()) for n in SHIPPED
                 if (WORK / f"{n}.results.json").exists()}, REPO / "models" / "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
