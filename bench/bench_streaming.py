"""Streaming cost of the paper-size HiSS model on CPU: one chunk step against recomputing a window.

What is measured, and why:
- The model a deployed node runs: HiSS with a 6-layer S4D (d_model 256) low level over chunks of
  10 samples and a 6-layer Mamba (d_model 128) high level, 6 inputs and 6 outputs, eval mode,
  batch 1, float32, everything under ``torch.inference_mode``.
- Streaming: the latency of one ``runner.step(x_chunk, state)`` call (``StepRunner``, the contract
  of ``model.step_chunk``; one output per chunk
  of 10 new samples, state carried across calls): median, p90 and p99 over many calls after a
  warm-up. This is the per-output cost of the node, independent of how long the stream ran.
- The alternative without a recurrent state: for every new chunk, rerun ``model(x_window)`` over
  the last 10 s of input: 1,000 samples at 100 Hz, 10,000 at 1,000 Hz (median of a few calls).
  window / step is the saving of streaming.
- Both with torch threads = 1 (a node sharing the CPU) and = os.cpu_count(), and for each step
  backend: ``eager`` (the default) and ``compile`` (``runner.set_backend("compile")``:
  the step compiled ahead of time by AOTInductor, ``hiss_ros.models.aot``; its compile time at the
  first step is reported, or its load when the on-disk cache already holds it).
- Sanity: stepping through the 100 Hz window chunk by chunk must reproduce ``model(window)``
  (max abs diff <= 1e-4) with each backend, or the script exits 1.
Targets: step median <= 1 ms; window / step >= 50x.

Usage (from the repository root):
    PYTHONPATH=$PWD .venv/bin/python bench/bench_streaming.py            # full run, writes docs/BENCHMARKS.md
    PYTHONPATH=$PWD .venv/bin/python bench/bench_streaming.py --quick    # small smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchutil import (
    DEFAULT_DOC,
    environment,
    load_average,
    markdown_table,
    median,
    percentile,
    text_table,
    time_calls,
    write_section,
)

from hiss_ros.models import STEP_BACKENDS, ChunkedModel, StepRunner, build_model

SECTION = "bench_streaming"
MODEL_CONFIG: dict[str, Any] = {
    "kind": "hiss", "input_dim": 6, "output_dim": 6, "chunk": 10,
    "low": {"kind": "s4d", "d_model": 256, "n_layers": 6},
    "high": {"kind": "mamba", "d_model": 128, "n_layers": 6},
}
WINDOW_SECONDS = 10
RATES_HZ = (100, 1000)
TARGET_STEP_MS = 1.0
TARGET_RATIO = 50.0
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Plan:
    step_calls: int
    step_warmup: int
    window_calls: int


FULL, QUICK = Plan(step_calls=500, step_warmup=50, window_calls=5), Plan(step_calls=50, step_warmup=5, window_calls=1)


@dataclass(frozen=True)
class Row:
    backend: str
    threads: int
    step_ms: list[float]  # one latency per runner.step call
    window_ms: dict[int, float]  # rate (Hz) -> median time of model(window)

    @property
    def step_median(self) -> float:
        return median(self.step_ms)

    def ratio(self, rate: int) -> float:
        return self.window_ms[rate] / self.step_median


def build() -> ChunkedModel:
    torch.manual_seed(0)
    return build_model(MODEL_CONFIG).eval()


def step_latencies(runner: StepRunner, plan: Plan) -> list[float]:
    """Milliseconds per runner.step call, state carried across calls, after plan.step_warmup calls."""
    model = runner.model
    chunk, dim = model.config.chunk, model.config.input_dim
    inputs = torch.randn(plan.step_warmup + plan.step_calls, 1, chunk, dim)
    state = model.init_state(1)
    times = []
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        _, state = runner.step(x, state)
        if i >= plan.step_warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def window_ms(model: ChunkedModel, rate: int, calls: int) -> float:
    """Median milliseconds of model(x) over a WINDOW_SECONDS window sampled at ``rate`` Hz."""
    x = torch.randn(1, WINDOW_SECONDS * rate, model.config.input_dim)
    return median(time_calls(lambda: model(x), calls)) * 1e3


def windows(model: ChunkedModel, threads: int, plan: Plan) -> dict[int, float]:
    torch.set_num_threads(threads)
    return {rate: window_ms(model, rate, plan.window_calls) for rate in RATES_HZ}


def compile_seconds(runner: StepRunner) -> float:
    """Seconds of the first step after switching to the compile backend (the compile itself)."""
    runner.set_backend("compile")
    model = runner.model
    x = torch.zeros(1, model.config.chunk, model.config.input_dim)
    t0 = time.perf_counter()
    runner.step(x, model.init_state(1))
    return time.perf_counter() - t0


def streaming_mismatch(runner: StepRunner) -> float:
    """Max abs difference between model(window) and stepping through the same window chunk by chunk."""
    model = runner.model
    chunk = model.config.chunk
    x = torch.randn(1, WINDOW_SECONDS * RATES_HZ[0], model.config.input_dim)
    offline = model(x)  # (1, K, O)
    state = model.init_state(1)
    steps = []
    for k in range(x.shape[1] // chunk):
        y, state = runner.step(x[:, k * chunk : (k + 1) * chunk], state)
        steps.append(y)
    return (torch.stack(steps, dim=1) - offline).abs().max().item()


# --- report -----------------------------------------------------------------------------------

HEADERS = ["step backend", "torch threads", "step median (ms)", "step p90 (ms)", "step p99 (ms)"] + [
    h for rate in RATES_HZ for h in (f"window {rate} Hz (ms)", f"window/step {rate} Hz")
]


def table_rows(rows: list[Row]) -> list[list[str]]:
    return [
        [r.backend, str(r.threads), f"{r.step_median:.3f}", f"{percentile(r.step_ms, 90):.3f}",
         f"{percentile(r.step_ms, 99):.3f}"]
        + [c for rate in RATES_HZ for c in (f"{r.window_ms[rate]:.1f}", f"{r.ratio(rate):.0f}x")]
        for r in rows
    ]


def target_lines(rows: list[Row]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for r in rows:
        worst = min(r.ratio(rate) for rate in RATES_HZ)
        lines.append(
            f"{r.backend}, {r.threads} thread(s): step median {r.step_median:.3f} ms (target <= {TARGET_STEP_MS:g} ms: "
            f"{verdict(r.step_median <= TARGET_STEP_MS)}); smallest window/step {worst:.0f}x "
            f"(target >= {TARGET_RATIO:.0f}x: {verdict(worst >= TARGET_RATIO)})"
        )
    return lines


def bound_lines(rows: list[Row]) -> list[str]:
    """Why window/step is small at a low rate: a window of K chunks costs K times the batched
    per-chunk cost, so window/step = K x (batched per-chunk cost / step)."""
    rate = RATES_HZ[0]
    chunks = WINDOW_SECONDS * rate // MODEL_CONFIG["chunk"]
    lines = []
    for threads in sorted({r.threads for r in rows}):
        per_chunk = next(r for r in rows if r.threads == threads).window_ms[rate] / chunks
        steps = ", ".join(f"{r.backend} {r.step_median / per_chunk:.1f}x" for r in rows if r.threads == threads)
        lines.append(
            f"{threads} thread(s), {rate} Hz: the window holds {chunks} chunks, computed batched at "
            f"{per_chunk:.3f} ms a chunk; a step costs {steps} that, so window/step is {chunks} / that "
            f"multiple (>= {TARGET_RATIO:.0f}x needs a step within {chunks / TARGET_RATIO:.1f}x the batched "
            "per-chunk cost, which one chunk at batch 1 does not reach on this CPU)"
        )
    return lines


def markdown(rows: list[Row], plan: Plan, n_params: int, mismatch: dict[str, float], compile_s: float,
             load: str) -> str:
    cfg = MODEL_CONFIG
    return (
        "## Streaming HiSS on CPU: one chunk step vs recomputing a window\n\n"
        f"HiSS, low {cfg['low']['n_layers']} x S4D d_model {cfg['low']['d_model']}, high "
        f"{cfg['high']['n_layers']} x Mamba d_model {cfg['high']['d_model']}, chunk {cfg['chunk']}, "
        f"{cfg['input_dim']} inputs, {cfg['output_dim']} outputs: {n_params:,} parameters. Eval mode, "
        "batch 1, float32, `torch.inference_mode`.\n"
        f"Step: latency of one `StepRunner.step` call ({plan.step_calls} calls after {plan.step_warmup} warm-up). "
        f"Window: `model(x)` over the last {WINDOW_SECONDS} s of input, recomputed for each new chunk "
        f"(median of {plan.window_calls} call(s) after one warm-up).\n\n"
        + markdown_table(HEADERS, table_rows(rows))
        + "\n"
        + "".join(f"- {line}\n" for line in target_lines(rows))
        + "".join(f"- {line}\n" for line in bound_lines(rows))
        + f"- Streaming vs offline over the {RATES_HZ[0]} Hz window, max abs diff: "
        + ", ".join(f"{b} {m:.2e}" for b, m in mismatch.items()) + f" (tolerance {TOLERANCE:g})\n"
        "- The compile backend's first step (the compile, or its load from hiss_ros's on-disk cache as found): "
        f"{compile_s:.1f} s\n\n"
        + environment(" and ".join(sorted({str(r.threads) for r in rows})), load)
    )


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few calls (smoke test); writes no docs unless --out is given")
    p.add_argument("--step-calls", type=int, default=None, help="timed runner.step calls per thread count (500)")
    p.add_argument("--window-calls", type=int, default=None, help="timed model(window) calls per rate (5)")
    p.add_argument("--out", type=Path, default=None, help=f"markdown file to update (default {DEFAULT_DOC})")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    load = load_average()
    plan = QUICK if args.quick else FULL
    plan = Plan(args.step_calls or plan.step_calls, plan.step_warmup, args.window_calls or plan.window_calls)
    thread_counts = sorted({1, os.cpu_count() or 1})
    model = build()
    runner = StepRunner(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, os.cpu_count() = {os.cpu_count()}, threads measured: {thread_counts}")
    print(f"model: {n_params:,} parameters; config {MODEL_CONFIG}")

    with torch.inference_mode():
        window = {threads: windows(model, threads, plan) for threads in thread_counts}
        print("  windows measured", flush=True)
        compile_s = compile_seconds(runner)
        print(f"  compile backend: first step (compile) {compile_s:.1f} s", flush=True)
        rows, mismatch = [], {}
        for backend in STEP_BACKENDS:
            runner.set_backend(backend)
            mismatch[backend] = streaming_mismatch(runner)
            print(f"  {backend}: streaming vs offline, {RATES_HZ[0]} Hz window: max abs diff {mismatch[backend]:.2e}")
            for threads in thread_counts:
                torch.set_num_threads(threads)
                rows.append(Row(backend, threads, step_latencies(runner, plan), window[threads]))
                print(f"  {backend}: measured with {threads} thread(s)", flush=True)

    print()
    print(text_table(HEADERS, table_rows(rows)))
    print()
    print("\n".join(target_lines(rows)))

    out = args.out or (None if args.quick else DEFAULT_DOC)
    if out is not None:
        write_section(out, SECTION, markdown(rows, plan, n_params, mismatch, compile_s, load))
    if max(mismatch.values()) > TOLERANCE:
        print(f"FAIL: streaming differs from offline by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
