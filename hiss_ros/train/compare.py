"""Model comparisons at equal budget, and chunk-size sweeps.

``--compare hiss,flat-mamba,...``: every model trains on the same data with the same settings;
each flat baseline's width is chosen so its parameter count is within 10% of the HiSS model's.
``--sweep chunk=5,10,20,40``: one HiSS per chunk size (output rate = input rate / chunk; the
training window keeps its duration in seconds). Both write ``comparison.md``, ``comparison.json``
and a bar chart ``comparison.png`` beside one training folder per entry, and report the
streaming cost (median ``step_chunk`` time, batch 1, CPU) of each model.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hiss_ros.checkpoint import atomic_write, load_checkpoint
from hiss_ros.errors import ConfigError
from hiss_ros.models import ChunkedModel, build_model
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import load_dataset
from hiss_ros.train.loop import MODEL_FILE, model_config, train

log = logging.getLogger(__name__)
FLAT_KINDS = ("mamba", "s4d", "lstm", "transformer")


def parameters(config: dict[str, Any]) -> int:
    return sum(p.numel() for p in build_model(config).parameters())


def matched_flat(base: dict[str, Any], kind: str, target: int) -> dict[str, Any]:
    """Flat model of ``kind`` (depth of the HiSS low level) whose width gives the parameter count
    closest to ``target`` (searched over multiples of 4; counts grow with width)."""
    low = base.get("low", {})
    layers = {"kind": kind, "n_layers": low.get("n_layers", 2), "dropout": low.get("dropout", 0.1)}
    io = {k: base[k] for k in ("input_dim", "output_dim", "chunk") if k in base}
    extra = {k: base[k] for k in ("deltas", "scale_deltas") if k in base}  # same input features

    def cfg(width: int) -> dict[str, Any]:
        return {"kind": "flat", **io, **extra, "layers": {**layers, "d_model": width}}

    lo, hi = 1, 256  # widths 4 .. 1024
    while lo < hi:
        mid = (lo + hi) // 2
        if parameters(cfg(4 * mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((4 * max(1, lo - 1), 4 * lo), key=lambda w: abs(parameters(cfg(w)) - target))
    return cfg(best)


def step_cost_ms(model: ChunkedModel, calls: int = 200) -> float:
    """Median milliseconds of one ``step_chunk`` (batch 1, CPU, one torch thread as in the node's
    default deployment, inference mode)."""
    model = model.cpu().eval()
    x = torch.randn(calls + 20, 1, model.config.chunk, model.config.input_dim)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            state = model.init_state(1)
            for i, xc in enumerate(x):
                t0 = time.perf_counter()
                _, state = model.step_chunk(xc, state)
                if i >= 20:
                    times.append(1e3 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _row(name: str, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    metrics = json.loads((out / "metrics.json").read_text())
    model = load_checkpoint(out / MODEL_FILE).model
    return {"name": name, "val_mse": metrics["val_mse"], "parameters": metrics["parameters"],
            "step_ms": round(step_cost_ms(model), 3), "train_seconds": metrics["seconds"], **extra}


def run_compare(cfg: TrainConfig, bags: list[Path], out: Path, models: list[str], cache_dir: Path | None,
                progress: bool = True, resume: bool = False) -> list[dict[str, Any]]:
    """Train each of ``models`` into ``out/<model>``; with ``resume``, models that finished are
    kept and an interrupted one continues where it stopped."""
    if "hiss" not in models or cfg.model.get("kind") != "hiss":
        raise ConfigError("--compare needs 'hiss' in the list and a hiss model in the config (the budget to match)")
    ds = load_dataset(cfg, bags, cache_dir, progress)
    base = model_config(cfg, ds)
    budget = parameters(base)
    rows = []
    for name in models:
        if name == "hiss":
            model = cfg.model
        else:
            kind = name.removeprefix("flat-")
            if kind not in FLAT_KINDS:
                raise ConfigError(f"--compare: unknown model {name!r}; use hiss or flat-{{{','.join(FLAT_KINDS)}}}")
            model = {k: v for k, v in matched_flat(base, kind, budget).items() if k not in ("input_dim", "output_dim",
                                                                                           "chunk")}
        if resume and (out / name / "metrics.json").is_file():
            log.info("compare: %s finished earlier, kept", name)
        else:
            log.info("compare: training %s", name)
            train(replace(cfg, model=model), ds, out / name, resume=resume, progress=progress)
        row = _row(name, out / name, {})
        row["budget_ratio"] = round(row["parameters"] / budget, 3)
        if abs(row["budget_ratio"] - 1) > 0.1:
            log.warning("compare: %s has %d parameters, %.0f%% of the budget", name, row["parameters"],
                        100 * row["budget_ratio"])
        rows.append(row)
    _report(out, rows, "Models at equal parameter budget",
            f"Budget: {budget:,} parameters (the HiSS model); each flat width is the multiple of 4 whose "
            "parameter count is closest to it.")
    return rows


def run_sweep(cfg: TrainConfig, bags: list[Path], out: Path, chunks: list[int], cache_dir: Path | None,
              progress: bool = True) -> list[dict[str, Any]]:
    base_chunk = round(cfg.input_rate_hz / cfg.output_rate_hz)
    rows = []
    for c in chunks:
        seq = max(4, round(cfg.train.seq_chunks * base_chunk / c))
        sub = replace(cfg, output_rate_hz=cfg.input_rate_hz / c, train=replace(cfg.train, seq_chunks=seq))
        log.info("sweep: chunk %d (%.3g Hz estimates, %d chunks per training window)", c, sub.output_rate_hz, seq)
        ds = load_dataset(sub, bags, cache_dir, progress)
        train(sub, ds, out / f"chunk_{c}", progress=progress)
        rows.append(_row(f"chunk {c}", out / f"chunk_{c}", {"chunk": c, "output_rate_hz": sub.output_rate_hz}))
    _report(out, rows, "Chunk-size sweep (HiSS)",
            "Output rate = input rate / chunk; each training window spans the same time.")
    return rows


def _report(out: Path, rows: list[dict[str, Any]], title: str, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.json", json.dumps(rows, indent=2).encode())
    lines = [f"# {title}", "", note, "",
             "| model | val MSE (normalised) | parameters | step_chunk (ms, batch 1, CPU) | training (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['val_mse']:.4f} | {r['parameters']:,} | {r['step_ms']:.3f} | {r['train_seconds']} |"
              for r in rows]
    atomic_write(out / "comparison.md", ("\n".join(lines) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    bars = ax.bar([r["name"] for r in rows], [r["val_mse"] for r in rows], color="C0")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("validation MSE (normalised)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
