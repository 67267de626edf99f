"""hiss-train: train an estimator from bags.

    hiss-train --config config/train.yaml --bag run1.mcap --bag run2.mcap --out runs/contact [--resume]
    torchrun --nproc_per_node 4 -m hiss_ros.train.cli --config ... --device cuda   # data-parallel (DDP)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from hiss_ros.cli_common import fail
from hiss_ros.errors import ConfigError, HissError
from hiss_ros.models import MODEL_CHOICES
from hiss_ros.serving import resolve_device
from hiss_ros.train.compare import run_compare, run_sweep
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import load_dataset
from hiss_ros.train.loop import train


def with_model(cfg: TrainConfig, choice: str) -> TrainConfig:
    """``hiss``: the config's model. ``flat-KIND``: a flat stack of KIND with the config's
    low-level width and depth."""
    if choice == "hiss":
        return cfg
    low = cfg.model.get("low") or cfg.model.get("layers") or {}
    layers = {k: v for k, v in low.items() if k in ("d_model", "n_layers", "dropout")}
    model = {"kind": "flat", "layers": {**layers, "kind": choice.split("-", 1)[1]}}
    model.update({k: cfg.model[k] for k in ("deltas", "scale_deltas", "variance") if k in cfg.model})
    return replace(cfg, model=model)


def main(argv: list[str] | None = None, on_epoch: Callable[[dict], None] | None = None) -> int:
    """Returns the exit code: 0 trained, 2 a user error (printed as one line, no traceback)."""
    p = argparse.ArgumentParser(prog="hiss-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="training config YAML (see config/train.yaml)")
    p.add_argument("--bag", required=True, action="append", type=Path, help="a bag (file or folder); repeatable")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", choices=MODEL_CHOICES, default="hiss")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hiss_ros",
                   help="where extracted bag arrays are cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compare", metavar="MODELS",
                   help=f"train each of a comma list (of {','.join(MODEL_CHOICES)}) "
                        "at the HiSS parameter budget into OUT/<model>, and write OUT/comparison.md")
    p.add_argument("--seeds", metavar="LIST", help="with --compare: train every model once per seed (e.g. 0,1,2) "
                   "and report mean +- std and HiSS's paired difference to the best flat model")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="with --compare: the same N (lr, weight decay) candidates for every model (the config's "
                        "own first), the best by validation MSE trains every seed")
    p.add_argument("--val-bag", action="append", type=Path, default=[],
                   help="an independent validation bag (early stopping, model selection); repeatable. Without "
                        "it the last train.val_fraction of each --bag validates")
    p.add_argument("--test-bag", action="append", type=Path, default=[],
                   help="with --compare: a held-out bag every trained model is scored on; repeatable")
    p.add_argument("--sweep", metavar="chunk=LIST", help="train one HiSS per chunk size, e.g. chunk=5,10,20,40; with "
                   "--compare, the whole comparison at each chunk size (flat baselines retrained at each rate)")
    p.add_argument("--msg-path", action="append", type=Path, default=[], metavar="FOLDER",
                   help="a folder of custom .msg files (<package>/msg/<Name>.msg) for bags that do not carry "
                        "their message definitions (sqlite3 bags before rosbag2 Iron); repeatable")
    p.add_argument("--allow-rate-mismatch", action="store_true",
                   help="train even where an input's measured rate differs from the configured one (a warning)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available (one GPU per torchrun process), else CPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        device = _device(args.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        cfg = with_model(TrainConfig.load(args.config), args.model)
        cfg = replace(cfg, msg_paths=(*cfg.msg_paths, *map(str, args.msg_path)),
                      allow_rate_mismatch=cfg.allow_rate_mismatch or args.allow_rate_mismatch)
        if args.compare is not None and not args.compare.strip(", "):
            raise ConfigError("--compare '': expected a comma-separated list of models, e.g. hiss,flat-mamba")
        if (args.seeds or args.test_bag or args.tune) and not args.compare:
            raise ConfigError("--seeds, --test-bag and --tune go with --compare")
        if args.tune < 0 or args.tune == 1:
            raise ConfigError(f"--tune {args.tune}: expected 2 or more candidates (0: no tuning)")
        if args.compare or args.sweep:
            rows = _comparison(cfg, args)
            print(json.dumps(rows, indent=2))
            return 0
        ds = load_dataset(cfg, args.bag, cache_dir=args.cache_dir, progress=not args.quiet, val_bags=args.val_bag)
        logging.info("train %d chunks, validation %d chunks, %d segment(s) skipped",
                     ds.train.chunks, ds.val.chunks, ds.skipped_segments)
        result = train(cfg, ds, args.out, resume=args.resume, progress=not args.quiet, device=device,
                       on_epoch=on_epoch)
    except (HissError, OSError) as exc:
        return fail("hiss-train", exc, args.out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps({"out": str(args.out), "val_mse": result.val_mse, "best_epoch": result.best_epoch,
                      "epochs_run": result.epochs_run}))
    return 0


def _comparison(cfg: TrainConfig, args: argparse.Namespace) -> list[dict]:
    compare = None
    if args.compare:
        models = [m.strip() for m in args.compare.split(",") if m.strip()]
        compare = {"models": models, "resume": args.resume, "seeds": _seeds(args.seeds), "test_bags": args.test_bag,
                   "tune": args.tune}
        if not args.sweep:
            return run_compare(cfg, args.bag, args.out, cache_dir=args.cache_dir, progress=not args.quiet,
                               val_bags=args.val_bag, **compare)
    key, _, values = args.sweep.partition("=")
    try:
        chunks = [int(v) for v in values.split(",")]
    except ValueError:
        chunks = []
    if key != "chunk" or not chunks or min(chunks) < 1:
        raise ConfigError(f"--sweep {args.sweep!r}: expected chunk=N,N,... with positive integers")
    return run_sweep(cfg, args.bag, args.out, chunks, args.cache_dir, progress=not args.quiet, val_bags=args.val_bag,
                     compare=compare)


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers such as 0,1,2")
    return seeds


def _device(choice: str) -> str:
    """The serving rule (auto: CUDA when there is one); under torchrun, this process's GPU."""
    device = resolve_device(choice)
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device


if __name__ == "__main__":
    raise SystemExit(main())
