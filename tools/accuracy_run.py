"""One accuracy experiment: train a model on BROAD training trials, score it on held-out trials.

    python tools/accuracy_run.py --config config/train_broad_velocity.yaml --model hiss --seed 0 \\
        --set train.seq_chunks=256 --set train.burn_in_chunks=32 --out out/acc/runs/NAME

Flat models get the width whose parameter count matches the config's HiSS model (as
``hiss-train --compare``). Writes ``OUT/result.json`` and appends it to ``out/acc/results.jsonl``:
the command, validation MSE (what model selection saw) and held-out test MSE (normalised, every
chunk; ``test_mse_steady`` leaves out each segment's first 32 chunks). Used for docs/ACCURACY.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BROAD = REPO / "out" / "broad"
TRAIN = "01,04,06,08,10,14,15,18,24"
TEST = "02,07,09,11,16,21,25"
TEST_MIN_CHUNKS = 64  # test segments shorter than this are left out, as in the shipped build's hiss-eval
STEADY_SKIP = 32  # chunks (1.1 s at 28.6 Hz) after each segment start not counted in the steady-state MSE


def trial_bags(trials: str) -> list[Path]:
    return [next(BROAD.glob(f"{t}_*")) for t in trials.split(",") if t]


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``section.key=value`` (value parsed as YAML) into the config mapping."""
    for item in sets:
        path, _, value = item.partition("=")
        *parents, key = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = yaml.safe_load(value)
    return data


def steady_mse(model: torch.nn.Module, split: Any) -> float:
    from hiss_ros.train.loop import predict

    pred = predict(model, split)
    truth = np.concatenate(split.y)
    keep = np.concatenate([np.arange(len(y)) >= STEADY_SKIP for y in split.y])
    return float(((pred - truth)[keep] ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    from hiss_ros.serving import load_model
    from hiss_ros.train.compare import matched_flat, parameters
    from hiss_ros.train.config import TrainConfig
    from hiss_ros.train.dataset import Split, collect_segments, load_dataset, normalised
    from hiss_ros.train.loop import model_config, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "config" / "train_broad_velocity.yaml")
    p.add_argument("--model", default="hiss", help="hiss or flat-KIND (matched to the HiSS budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="section.key=value override; repeatable")
    p.add_argument("--train", default=TRAIN, help="training trials (comma list)")
    p.add_argument("--val", default="", help="validation trials (default: the end of each training trial)")
    p.add_argument("--test", default=TEST, help="held-out test trials")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = apply_sets(yaml.safe_load(args.config.read_text()), [*args.set, f"train.seed={args.seed}"])
    cfg = TrainConfig.from_dict(data, source=str(args.config))
    cache = REPO / "out" / "cache"
    ds = load_dataset(cfg, trial_bags(args.train), cache, progress=False, val_bags=trial_bags(args.val))
    base = model_config(cfg, ds)
    if args.model != "hiss":
        flat = matched_flat(base, args.model.removeprefix("flat-"), parameters(base))
        cfg = replace(cfg, model={k: v for k, v in flat.items() if k not in ("input_dim", "output_dim", "chunk")})
    result = train(cfg, ds, args.out, progress=False)
    ckpt = load_model(args.out / "model.safetensors")
    # The same test chunks for every run: segments as long as the shipped build's windows (64 chunks).
    fixed = replace(cfg, train=replace(cfg.train, seq_chunks=TEST_MIN_CHUNKS, burn_in_chunks=0))
    seg = collect_segments(fixed, trial_bags(args.test), cache, progress=False, val_fraction=0.0)
    test = normalised(Split(seg.train.x, seg.train.y, seg.train.stamps), ckpt.spec.normalization)
    from hiss_ros.train.loop import evaluate

    test_mse, _ = evaluate(ckpt.model, test)
    row = {"name": args.out.name, "model": args.model, "seed": args.seed, "sets": args.set, "val": args.val,
           "command": " ".join(["python tools/accuracy_run.py", *sys.argv[1:]]),
           "val_mse": result.val_mse, "test_mse": test_mse, "test_mse_steady": steady_mse(ckpt.model, test),
           "test_chunks": test.chunks, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
           "parameters": sum(p.numel() for p in ckpt.model.parameters()), "seconds": round(result.seconds, 1)}
    (args.out / "result.json").write_text(json.dumps(row, indent=2))
    with (REPO / "out" / "acc" / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
