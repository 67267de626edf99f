"""Model comparisons at equal budget, and chunk-size sweeps.

``--compare hiss,flat-mamba,...``: every model trains on the same data with the same settings;
each flat baseline's width is chosen so its parameter count is within 10% of the HiSS model's.
``--tune N``: before that, every model gets the same tuning budget: the same N (lr, weight decay)
candidates (the config's own first, then N - 1 distinct ones drawn log-uniformly from ``TUNE_LR`` and
``TUNE_WEIGHT_DECAY`` by a fixed generator, so identical for every model), each trained once with
the first seed into ``<model>/tune_<i>``; the one with the lowest validation MSE trains every seed
(its first-seed run is the tuning run itself, reused). Chosen on validation only, never on test.
``--sweep chunk=5,10,20,40``: one HiSS per chunk size (output rate = input rate / chunk; the
training window keeps its duration in seconds); with ``--compare`` too, the whole comparison at
each chunk size, so the flat baselines are retrained at each estimate rate. Both write
``comparison.md``, ``comparison.json`` and a bar chart ``comparison.png`` beside one training
folder per entry, and report the streaming cost (median ``step_chunk`` time, batch 1, CPU) of
each model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hiss_ros.checkpoint import MODEL_FILE, atomic_write, load_checkpoint
from hiss_ros.errors import ConfigError
from hiss_ros.models import MODEL_CHOICES, ChunkedModel, StepRunner, build_model
from hiss_ros.serving import load_model
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import collect_segments, load_dataset, normalised
from hiss_ros.train.loop import evaluate, model_config, train

log = logging.getLogger(__name__)
TUNE_LR, TUNE_WEIGHT_DECAY = (3e-4, 1e-2), (1e-4, 1e-1)  # log-uniform ranges of --tune's candidates


def tune_candidates(n: int, lr: float, weight_decay: float) -> list[dict[str, float]]:
    """``n`` distinct (lr, weight_decay) settings: the config's own, then log-uniform draws from a
    generator of fixed seed (the same list for every model and run); a draw equal to an earlier
    candidate is skipped (the default recipe is such a draw: it would train one setting twice)."""
    rng = random.Random(20260211)

    def draw(lo: float, hi: float) -> float:
        return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")

    out = [{"lr": lr, "weight_decay": weight_decay}]
    while len(out) < n:
        candidate = {"lr": draw(*TUNE_LR), "weight_decay": draw(*TUNE_WEIGHT_DECAY)}
        if candidate not in out:
            out.append(candidate)
    return out


def parameters(config: dict[str, Any]) -> int:
    return sum(p.numel() for p in build_model(config).parameters())


def matched_flat(base: dict[str, Any], kind: str, target: int) -> dict[str, Any]:
    """Flat model of ``kind`` (depth of the HiSS low level) whose width gives the parameter count
    closest to ``target`` (searched over multiples of 4; counts grow with width)."""
    low = base.get("low", {})
    layers = {"kind": kind, "n_layers": low.get("n_layers", 2), "dropout": low.get("dropout", 0.1)}
    io = {k: base[k] for k in ("input_dim", "output_dim", "chunk") if k in base}
    extra = {k: base[k] for k in ("deltas", "scale_deltas", "variance") if k in base}  # same features and head

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


def step_cost_ms(model: ChunkedModel, calls: int = 200, backend: str = "eager") -> float:
    """Median milliseconds of one streaming step as served (``StepRunner`` with ``backend``, eager
    by default, as every model kind has it: batch 1, CPU, one torch thread as in the node's default
    deployment, inference mode)."""
    model = model.cpu().eval()
    runner = StepRunner(model, backend)
    x = torch.randn(calls + 20, 1, model.config.chunk, model.config.input_dim)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            state = model.init_state(1)
            for i, xc in enumerate(x):
                t0 = time.perf_counter()
                _, state = runner.step(xc, state)
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


def _test_mse(folder: Path, cfg: TrainConfig, test_bags: list[Path], cache_dir: Path | None,
              progress: bool) -> float:
    """Normalised MSE over every chunk of ``test_bags``, each segment streamed whole from its start
    (segments shorter than ``train.seq_chunks`` left out, as collect_segments does)."""
    served = load_model(folder / MODEL_FILE)
    seg = collect_segments(cfg, test_bags, cache_dir, progress, val_fraction=0.0)
    return evaluate(served.model, normalised(seg.train, served.spec.normalization))[0]


def _model_for(name: str, base: dict[str, Any], budget: int, cfg: TrainConfig) -> dict[str, Any]:
    if name == "hiss":
        return cfg.model
    kind = name.removeprefix("flat-")
    return {k: v for k, v in matched_flat(base, kind, budget).items() if k not in ("input_dim", "output_dim", "chunk")}


def run_compare(cfg: TrainConfig, bags: list[Path], out: Path, models: list[str], cache_dir: Path | None,
                progress: bool = True, resume: bool = False, seeds: list[int] | None = None,
                val_bags: list[Path] | None = None, test_bags: list[Path] | None = None,
                tune: int = 0) -> list[dict[str, Any]]:
    """Train each of ``models`` into ``out/<model>`` (``out/<model>/seed_<s>`` for several
    ``seeds``); with ``resume``, models that finished are kept and an interrupted one continues
    where it stopped. ``val_bags``: independent validation recordings (early stopping, model
    selection); ``test_bags``: held-out recordings, scored after training and never used in it;
    ``tune``: that many (lr, weight decay) candidates per model first (see the module)."""
    for name in models:  # before anything else: a typo is not a missing 'hiss'
        if name not in MODEL_CHOICES:
            raise ConfigError(f"--compare: unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)}")
    if "hiss" not in models or cfg.model.get("kind") != "hiss":
        raise ConfigError("--compare needs 'hiss' in the list and a hiss model in the config (the budget to match)")
    seeds = seeds or [cfg.train.seed]
    ds = load_dataset(cfg, bags, cache_dir, progress, val_bags=val_bags or ())
    base = model_config(cfg, ds)
    budget = parameters(base)
    rows = []
    for name in models:
        model = _model_for(name, base, budget, cfg)
        settings, tuning = cfg.train, None
        if tune:
            settings, tuning = _tune(replace(cfg, model=model, train=replace(cfg.train, seed=seeds[0])), ds,
                                     out / name, tune, resume, progress)
        runs = []
        for seed in seeds:
            folder = out / name if len(seeds) == 1 and not tune else out / name / f"seed_{seed}"
            if resume and (folder / "metrics.json").is_file():
                log.info("compare: %s (seed %d) finished earlier, kept", name, seed)
            elif tuning and seed == seeds[0]:  # the chosen tuning run is this very training
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(out / name / f"tune_{tuning['chosen']}", folder)
            else:
                log.info("compare: training %s (seed %d)", name, seed)
                train(replace(cfg, model=model, train=replace(settings, seed=seed)), ds, folder, resume=resume,
                      progress=progress)
            run = _row(name, folder, {"seed": seed})
            if test_bags:
                run["test_mse"] = _test_mse(folder, cfg, test_bags, cache_dir, progress)
            runs.append(run)
        row = _aggregate(runs)
        if tuning:
            row["tuning"] = tuning
        row["budget_ratio"] = round(row["parameters"] / budget, 3)
        if abs(row["budget_ratio"] - 1) > 0.1:
            log.warning("compare: %s has %d parameters, %.0f%% of the budget", name, row["parameters"],
                        100 * row["budget_ratio"])
        rows.append(row)
    verdict = paired_verdict(rows, "test_mse" if test_bags else "val_mse")
    if verdict:
        rows[models.index("hiss")]["vs_best_flat"] = verdict
    _report(out, rows, "Models at equal parameter budget",
            f"Budget: {budget:,} parameters (the HiSS model); each flat width is the multiple of 4 whose "
            f"parameter count is closest to it. Seeds: {', '.join(map(str, seeds))}; mean +- standard deviation "
            f"over seeds where there are several. Validation: "
            f"{'independent recordings' if val_bags else 'the last part of each training recording'}." +
            (f" Tuning: the same {tune} (lr, weight decay) candidates for every model, chosen by validation "
             f"MSE with seed {seeds[0]}." if tune else "") +
            (f"\n\n{verdict['text']}" if verdict else ""))
    return rows


def _tune(cfg: TrainConfig, ds: Any, folder: Path, n: int, resume: bool,
          progress: bool) -> tuple[Any, dict[str, Any]]:
    """Train ``cfg`` once per candidate into ``folder/tune_<i>``; (the chosen settings, a record
    of every candidate's validation MSE and the chosen index)."""
    trials = []
    for i, cand in enumerate(tune_candidates(n, cfg.train.lr, cfg.train.weight_decay)):
        trial = folder / f"tune_{i}"
        if resume and (trial / "metrics.json").is_file():
            log.info("tune: %s candidate %d finished earlier, kept", folder.name, i)
        else:
            log.info("tune: %s candidate %d of %d: lr %g, weight decay %g", folder.name, i + 1, n, cand["lr"],
                     cand["weight_decay"])
            train(replace(cfg, train=replace(cfg.train, **cand)), ds, trial, resume=resume, progress=progress)
        trials.append({**cand, "val_mse": json.loads((trial / "metrics.json").read_text())["val_mse"]})
    chosen = min(range(n), key=lambda i: trials[i]["val_mse"])
    log.info("tune: %s takes lr %g, weight decay %g (validation MSE %.5f)", folder.name, trials[chosen]["lr"],
             trials[chosen]["weight_decay"], trials[chosen]["val_mse"])
    pick = {k: trials[chosen][k] for k in ("lr", "weight_decay")}
    return replace(cfg.train, **pick), {"candidates": trials, "chosen": chosen, **pick}


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per model: the first seed's fields, metrics averaged over seeds (``*_std``: their
    sample standard deviation, 0 for one seed) and every seed's own row under ``per_seed``."""
    row = dict(runs[0])
    del row["seed"]
    for key in ("val_mse", "test_mse", "step_ms", "train_seconds"):
        if key in row:
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["per_seed"] = runs
    return row


def paired_verdict(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """HiSS against the flat model with the lowest mean validation MSE (chosen without test data),
    paired seed by seed on ``metric``: a win or a loss only where the mean difference is beyond
    twice the standard deviation of the per-seed differences; one seed is no basis for a call."""
    hiss = next(r for r in rows if r["name"] == "hiss")
    flats = [r for r in rows if r["name"] != "hiss"]
    if not flats:
        return None
    best = min(flats, key=lambda r: r["val_mse"])
    diffs = [a[metric] - b[metric] for a, b in zip(hiss["per_seed"], best["per_seed"], strict=True)]
    mean = statistics.fmean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    if len(diffs) < 2:
        call = "no call (one seed)"
    elif abs(mean) > 2 * spread:
        call = "win" if mean < 0 else "loss"
    else:
        call = "no clear difference"
    text = (f"HiSS - {best['name']} (best flat model by validation MSE), {metric} paired over "
            f"{len(diffs)} seed(s): {mean:+.4f}" + (f" +- {spread:.4f}" if len(diffs) > 1 else "") +
            f" per seed ({', '.join(f'{d:+.4f}' for d in diffs)}): **{call}**.")
    return {"against": best["name"], "metric": metric, "diffs": diffs, "mean": mean,
            "std": None if math.isnan(spread) else spread, "call": call, "text": text}


def run_sweep(cfg: TrainConfig, bags: list[Path], out: Path, chunks: list[int], cache_dir: Path | None,
              progress: bool = True, val_bags: list[Path] | None = None,
              compare: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One HiSS per chunk size into ``out/chunk_<c>``; with ``compare`` (``run_compare``'s models,
    seeds, test_bags, tune, resume), a whole comparison per chunk size instead, the flat baselines
    retrained at each estimate rate, and one row per model and chunk size."""
    base_chunk = round(cfg.input_rate_hz / cfg.output_rate_hz)
    rows = []
    for c in chunks:
        seq = max(4, round(cfg.train.seq_chunks * base_chunk / c))
        sub = replace(cfg, output_rate_hz=cfg.input_rate_hz / c, train=replace(cfg.train, seq_chunks=seq))
        log.info("sweep: chunk %d (%.3g Hz estimates, %d chunks per training window)", c, sub.output_rate_hz, seq)
        extra = {"chunk": c, "output_rate_hz": sub.output_rate_hz}
        if compare:
            for row in run_compare(sub, bags, out / f"chunk_{c}", cache_dir=cache_dir, progress=progress,
                                   val_bags=val_bags, **compare):
                rows.append({**row, **extra, "name": f"{row['name']}, chunk {c}"})
            continue
        ds = load_dataset(sub, bags, cache_dir, progress, val_bags=val_bags or ())
        train(sub, ds, out / f"chunk_{c}", progress=progress)
        rows.append(_row(f"chunk {c}", out / f"chunk_{c}", extra))
    note = "Output rate = input rate / chunk; each training window spans the same time."
    if compare:
        note += " Each chunk size's own comparison (and paired verdict) is in chunk_<c>/comparison.md."
    _report(out, rows, "Chunk-size sweep" + (" (every model retrained at each chunk size)" if compare else " (HiSS)"),
            note)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return ""
    if len(row.get("per_seed", ())) > 1:
        return f"{row[key]:.4f} +- {row[key + '_std']:.4f}"
    return f"{row[key]:.4f}"


def _report(out: Path, rows: list[dict[str, Any]], title: str, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.json", json.dumps(rows, indent=2).encode())
    test = any("test_mse" in r for r in rows)
    lines = [f"# {title}", "", note, "",
             "| model | val MSE (normalised) |" + (" held-out test MSE (normalised) |" if test else "") +
             " parameters | step_chunk (ms, batch 1, CPU) | training (s) |",
             "|---|---|" + ("---|" if test else "") + "---|---|---|"]
    lines += [f"| {r['name']} | {_cell(r, 'val_mse')} |" + (f" {_cell(r, 'test_mse')} |" if test else "") +
              f" {r['parameters']:,} | {r['step_ms']:.3f} | {round(r['train_seconds'], 1)} |" for r in rows]
    for r in (r for r in rows if "tuning" in r):
        t = r["tuning"]
        lines += ["", f"Tuning of {r['name']}: " + ", ".join(
            f"{'**' if i == t['chosen'] else ''}lr {c['lr']:g} / wd {c['weight_decay']:g}: {c['val_mse']:.4f}"
            f"{'**' if i == t['chosen'] else ''}" for i, c in enumerate(t["candidates"]))]
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
