"""hiss-eval: a trained model on bags -> metrics.json, predictions.csv and PNG plots.

    hiss-eval --model runs/contact --bag run3.mcap --out runs/contact/eval_run3 [--split val|all]

``--split val`` (default) evaluates the validation part of each segment exactly as the trainer
did (for a model trained with ``--val-bag``: each whole segment, as it validated on those bags),
so its ``val_mse`` reproduces the trainer's; ``all`` evaluates each whole segment as one
stream from its start, as the live node runs it.

For a model with the variance head, the calibrated variance (as served) is checked on the same
chunks: ``metrics.json`` gets ``calibration`` (per channel the fraction of errors within 1, 2, 3
predicted standard deviations, ideally 0.683 / 0.954 / 0.997, mean z^2, the Gaussian NLL in
normalised units, and the reliability diagram's points), ``calibration.png`` plots the observed
against the expected coverage of central intervals, and the predictions plot shows +-2 std.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hiss_ros.checkpoint import MODEL_FILE
from hiss_ros.cli_common import MARKER, fail, staged_folder, strict_json
from hiss_ros.errors import HissError
from hiss_ros.models import config_to_dict
from hiss_ros.serving import load_model
from hiss_ros.train.calibration import calibration_metrics
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import collect_segments, normalised, whole_segments
from hiss_ros.train.loop import predict_gaussian

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict
    stamps_ns: np.ndarray  # (K,)
    pred: np.ndarray  # (K, O) physical units
    truth: np.ndarray  # (K, O)
    channels: list[str]
    std: np.ndarray | None = None  # (K, O) predicted standard deviation, physical units (variance head only)


def evaluate_bags(model_path: Path, bags: list[Path], split: str = "val", cache_dir: Path | None = None,
                  progress: bool = True, msg_paths: Sequence[str | Path] = (),
                  allow_rate_mismatch: bool = False) -> Evaluation:
    served = load_model(model_path)  # the serving spec: the node's normalisation, streams and pipeline
    cfg = TrainConfig.from_checkpoint(served.data, config_to_dict(served.model.config))
    cfg = replace(cfg, msg_paths=tuple(map(str, msg_paths)), allow_rate_mismatch=allow_rate_mismatch)
    rates = served.spec.expected_rates_hz()
    if split == "val" and served.data.get("whole_val_bags"):  # trained with --val-bag: it validated on whole bags
        raw = collect_segments(cfg, bags, cache_dir, progress, val_fraction=0.0, expected_rates=rates).train
    else:
        seg = collect_segments(cfg, bags, cache_dir, progress, expected_rates=rates)
        raw = seg.val if split == "val" else whole_segments(seg)
    if not raw.y:
        raise HissError(f"nothing to evaluate in {', '.join(map(str, bags))} (no segment long enough)")
    norm = served.spec.normalization
    data = normalised(raw, norm)
    pred_n, log_var = predict_gaussian(served.model, data)
    truth_n = np.concatenate(data.y)
    pred, truth = norm.physical(pred_n), np.concatenate(raw.y)
    chunks = np.concatenate(data.x)  # (K, chunk, C): what each estimate was made from
    novelty = served.spec.novelty
    score = None if novelty is None else novelty.score(chunks)  # (K,)
    variance = None if log_var is None else served.spec.physical_variance(log_var, chunks, score)  # (K, O) as served
    channels = served.spec.output_channels
    mse = ((pred - truth) ** 2).mean(0)
    metrics = {
        "split": split,
        "val_mse" if split == "val" else "mse_normalised": float(((pred_n - truth_n) ** 2).mean()),
        "mse": dict(zip(channels, mse.tolist(), strict=True)),
        "rmse": dict(zip(channels, np.sqrt(mse).tolist(), strict=True)),
        "chunks": len(pred),
        "model": served.path,
        "bags": [str(b) for b in bags],
    }
    if novelty is not None:  # how unlike the training chunks these are (1: typical)
        metrics["novelty"] = {"median": float(np.median(score)), "p99": float(np.percentile(score, 99)),
                              "warn_level": novelty.warn,
                              "fraction_above_warn_level": float((score > novelty.warn).mean()),
                              "variance_inflation": novelty.inflate and variance is not None}
    if variance is not None:  # normalised units: the NLL of each channel on the same scale
        metrics["calibration"] = calibration_metrics(pred_n - truth_n, variance / norm.output_std ** 2, channels)
    return Evaluation(metrics, np.concatenate(raw.stamps), pred, truth, channels,
                      None if variance is None else np.sqrt(variance))


def write_report(ev: Evaluation, out: Path) -> None:
    """predictions.csv, the plots and metrics.json into ``out``, all or nothing (``staged_folder``)."""
    metrics = strict_json(ev.metrics, str(out / "metrics.json"))  # refused before anything is written
    with staged_folder(out) as tmp:
        with (tmp / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            stds = [f"std {c}" for c in ev.channels] if ev.std is not None else []
            w.writerow(["stamp_ns", *(f"pred {c}" for c in ev.channels), *(f"truth {c}" for c in ev.channels), *stds])
            std = ev.std if ev.std is not None else np.empty((len(ev.pred), 0))  # (K, O) or (K, 0)
            for t, p, y, sd in zip(ev.stamps_ns, ev.pred, ev.truth, std, strict=True):
                w.writerow([int(t), *(f"{v:.6g}" for v in p), *(f"{v:.6g}" for v in y), *(f"{v:.6g}" for v in sd)])
        _plots(ev, tmp)
        (tmp / MARKER).write_bytes(metrics)


def _plots(ev: Evaluation, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = (ev.stamps_ns - ev.stamps_ns[0]) / 1e9
    n = len(ev.channels)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n + 1), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(t, ev.truth[:, i], ".", ms=2, color="k", label="ground truth")
        ax.plot(t, ev.pred[:, i], ".", ms=2, color="C1", label="estimate")
        if ev.std is not None:
            ax.fill_between(t, ev.pred[:, i] - 2 * ev.std[:, i], ev.pred[:, i] + 2 * ev.std[:, i], color="C1",
                            alpha=0.25, lw=0, label="estimate +- 2 std")
        ax.set_ylabel(ev.channels[i].split(":")[-1], fontsize=8)
    axes[0, 0].legend(loc="upper right", markerscale=4)
    axes[-1, 0].set_xlabel("time since first evaluated chunk [s] (segments concatenated)")
    fig.suptitle(f"hiss-eval: estimate vs ground truth ({ev.metrics['split']} split)")
    fig.tight_layout()
    fig.savefig(out / "predictions.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(ev.channels):
        ax.hist(ev.pred[:, i] - ev.truth[:, i], bins=60, histtype="step", label=c.split(":")[-1])
    ax.set_xlabel("error (estimate - ground truth), physical units")
    ax.set_ylabel("chunks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "errors.png", dpi=100)
    plt.close(fig)
    if "calibration" in ev.metrics:
        _reliability_plot(plt, ev.metrics["calibration"]["reliability"], out / "calibration.png")


def _reliability_plot(plt: Any, reliability: dict[str, Any], path: Path) -> None:
    """Observed against expected coverage of central intervals, one line per channel; a calibrated
    channel lies on the diagonal, an over-confident one below it."""
    fig, ax = plt.subplots(figsize=(6, 6))
    expected = reliability["expected"]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    for i, (c, observed) in enumerate(reliability["observed"].items()):
        style = "-" if i < 10 else "--"  # matplotlib's cycle has 10 colours
        ax.plot(expected, observed, marker=".", ls=style, ms=3, lw=1, label=c.split(":")[-1])
    ax.set_xlabel("expected coverage of the central interval")
    ax.set_ylabel("observed fraction of errors inside it")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hiss-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="training output folder or a .safetensors checkpoint")
    p.add_argument("--bag", required=True, action="append", type=Path, help="a bag (file or folder); repeatable")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hiss_ros")
    p.add_argument("--msg-path", action="append", type=Path, default=[], metavar="FOLDER",
                   help="a folder of custom .msg files, for bags that do not carry their definitions; repeatable")
    p.add_argument("--allow-rate-mismatch", action="store_true",
                   help="evaluate even where an input's measured rate differs from the trained one")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if (args.out / MODEL_FILE).exists():  # its metrics.json is the training's
            raise HissError(f"--out {args.out} holds a trained model: its metrics.json would be replaced by the "
                            f"evaluation's; give hiss-eval a folder of its own, e.g. --out {args.out / 'eval'}")
        ev = evaluate_bags(args.model, args.bag, args.split, args.cache_dir, progress=not args.quiet,
                           msg_paths=args.msg_path, allow_rate_mismatch=args.allow_rate_mismatch)
        write_report(ev, args.out)
    except (HissError, OSError) as exc:
        return fail("hiss-eval", exc, args.out)
    shown = {k: v for k, v in ev.metrics.items() if k not in ("bags", "model")}
    if "calibration" in shown:  # the diagram's points are in metrics.json and calibration.png
        shown["calibration"] = {k: v for k, v in shown["calibration"].items() if k != "reliability"}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
