"""Our pure-PyTorch Mamba against mambapy's, on CPU: speed, peak memory and agreement.

What is measured, and why:
- A 4-layer, d_model 128 Mamba stack over a (32, 512, 128) float32 batch, forward under
  ``torch.no_grad`` and forward+backward (loss = mean of squared outputs), in three versions:
  ours (``hiss_ros.models.Stack`` of kind "mamba", a blocked selective scan with a hand-written
  backward), mambapy with its parallel (Blelloch) scan, and mambapy with its sequential loop.
  This is the training-time cost our CPU path was written to cut.
- The stacks differ only around the mixers: ours adds an input Linear, LayerNorms and a final
  norm, mambapy uses RMSNorm; these are negligible next to the scans.
- Every (implementation, mode) runs in a fresh subprocess (``--worker IMPL MODE``, one JSON
  line out), so its peak RSS (``ru_maxrss``) is a clean peak-memory figure for that measurement
  alone. The peak is reset (``/proc/self/clear_refs``) right before the timed runs, after the
  warm-up; "RSS increase" is that peak over the RSS at that moment: the working memory of a pass.
- One warm-up call on a 64-step prefix of the input (thread pools, kernels, autograd engine),
  then the median of up to N timed calls (``--repeats``, default 3); a measurement stops early
  once one more call would take its timed total past ``--budget`` seconds (default 30), so the
  slow mambapy modes get a single timed call. A watchdog ends a measurement still running after
  ``--limit`` seconds (default 150) and reports that time as a lower bound: mambapy's sequential
  forward+backward (its autograd through an L-step Python loop is O(L^2) in memory traffic)
  had not finished after 11 minutes on a busy 2-core machine. The whole script takes 4 to 6
  minutes on 2 cores.
- Correctness: each of our mixers' weights is loaded into a mambapy ``MambaBlock`` (same
  parameter names and shapes); on the same (2, 512) input and output cotangent, the outputs and
  input gradients must agree to 1e-4 (max abs), and the parameter gradients to 1e-4 relative to
  their largest entry, for both mambapy modes, or the script exits 1.

Usage (from the repository root):
    PYTHONPATH=$PWD .venv/bin/python bench/bench_mamba.py            # full run, writes docs/BENCHMARKS.md
    PYTHONPATH=$PWD .venv/bin/python bench/bench_mamba.py --quick    # small smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from benchutil import (
    DEFAULT_DOC,
    environment,
    load_average,
    markdown_table,
    median,
    text_table,
    time_calls,
    write_section,
)
from mambapy.mamba import Mamba as PeerMamba
from mambapy.mamba import MambaConfig
from torch import Tensor, nn

from hiss_ros.models import Stack, StackConfig

SECTION = "bench_mamba"
D_MODEL, N_LAYERS = 128, 4
IMPLS = ("ours", "mambapy-pscan", "mambapy-seq")
MODES = ("fwd", "fwdbwd")
MODE_NAMES = {"fwd": "forward (no_grad)", "fwdbwd": "forward+backward"}
TOLERANCE = 1e-4
TARGET_SPEEDUP = 5.0
NORM_NOTE = (
    "The stacks differ only in their norms (ours: LayerNorm per block, an encoder Linear and a final "
    "LayerNorm; mambapy: RMSNorm per block), a negligible cost next to the selective scans."
)


@dataclass(frozen=True)
class Size:
    batch: int
    length: int


FULL, QUICK = Size(32, 512), Size(4, 128)
CHECK_FULL, CHECK_QUICK = Size(2, 512), Size(2, 64)  # seq backward is O(L^2): keep the check small
WARMUP_LENGTH = 64  # warm-up call on this prefix of the input


def build(impl: str) -> nn.Module:
    if impl == "ours":
        return Stack(D_MODEL, StackConfig(kind="mamba", d_model=D_MODEL, n_layers=N_LAYERS, dropout=0.0))
    return PeerMamba(MambaConfig(d_model=D_MODEL, n_layers=N_LAYERS, pscan=impl == "mambapy-pscan"))


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); without it the peak is the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# --- worker: one (implementation, mode) measurement in its own process -----------------------


@dataclass
class Result:
    impl: str
    mode: str
    times: list[float]  # seconds per completed timed call
    rss_before_mib: float
    peak_rss_mib: float = 0.0
    threads: int = 0
    stopped_after_s: float | None = None  # set when the --limit watchdog ended the run

    @property
    def seconds(self) -> float:
        """Median time, or (when stopped before any call completed) a lower bound."""
        return median(self.times) if self.times else float(self.stopped_after_s or math.nan)

    @property
    def is_lower_bound(self) -> bool:
        return not self.times


def emit(result: Result) -> None:
    print(json.dumps(asdict(result)), flush=True)


def abandon(result: Result, limit_s: float) -> None:
    """Watchdog: report what was measured so far and end the worker."""
    result.peak_rss_mib = peak_rss_mib()
    result.stopped_after_s = limit_s
    emit(result)
    os._exit(0)


def run_worker(impl: str, mode: str, size: Size, args: argparse.Namespace) -> Result:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(impl)
    x = torch.randn(size.batch, size.length, D_MODEL)

    def call(inputs: Tensor) -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(inputs)
        else:
            model.zero_grad(set_to_none=True)
            model(inputs).square().mean().backward()

    call(x[:, :WARMUP_LENGTH])  # warm-up: thread pools, kernels, autograd engine; cheap even for the slow modes
    result = Result(impl, mode, [], rss_mib(), threads=torch.get_num_threads())
    reset_peak_rss()
    watchdog = threading.Timer(args.limit, abandon, (result, args.limit))
    watchdog.daemon = True
    watchdog.start()
    time_calls(lambda: call(x), args.repeats, warmup=0, budget_s=args.budget, out=result.times)
    watchdog.cancel()
    result.peak_rss_mib = peak_rss_mib()
    return result


def measure(impl: str, mode: str, size: Size, args: argparse.Namespace) -> Result:
    """Run one worker subprocess and return its result."""
    cmd = [
        sys.executable, __file__, "--worker", impl, mode, "--batch", str(size.batch), "--length", str(size.length),
        "--repeats", str(args.repeats), "--budget", str(args.budget), "--limit", str(args.limit),
        "--threads", str(args.threads),
    ]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=2 * args.limit + 120)
    if proc.returncode:
        sys.exit(f"worker {impl} {mode} failed ({proc.returncode}):\n{proc.stderr}")
    result = Result(**json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"  {impl:14s} {mode:7s} median (s): {seconds_cell(result)}, runs: {runs_cell(result)}", flush=True)
    return result


# --- correctness: our mixers against mambapy's MambaBlock with the same weights ----------------


def mixer_pass(mixer: nn.Module, x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input gradient and parameter gradients of ``mixer`` for loss = <y, cotangent>."""
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = mixer(x)
    (y * cotangent).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in mixer.named_parameters()}


def check_mixers(size: Size) -> dict[str, dict[str, float]]:
    """Max abs differences, per mambapy mode, of outputs, input grads and (relative) parameter grads."""
    torch.manual_seed(0)
    ours = build("ours")
    peers = {"pscan": build("mambapy-pscan"), "seq": build("mambapy-seq")}
    diffs = {name: {"output": 0.0, "input grad": 0.0, "param grads (rel.)": 0.0} for name in peers}
    for i, block in enumerate(ours.blocks):
        x = torch.randn(size.batch, size.length, D_MODEL)
        cotangent = torch.randn(size.batch, size.length, D_MODEL)
        y, gx, gp = mixer_pass(block.mixer, x, cotangent)
        for name, peer in peers.items():
            mixer = peer.layers[i].mixer
            mixer.load_state_dict(block.mixer.state_dict())
            py, pgx, pgp = mixer_pass(mixer, x, cotangent)
            d = diffs[name]
            d["output"] = max(d["output"], (py - y).abs().max().item())
            d["input grad"] = max(d["input grad"], (pgx - gx).abs().max().item())
            for n, g in gp.items():
                rel = ((pgp[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                d["param grads (rel.)"] = max(d["param grads (rel.)"], rel)
    return diffs


def check_failed(diffs: dict[str, dict[str, float]]) -> bool:
    return any(value > TOLERANCE for d in diffs.values() for value in d.values())


# --- report -----------------------------------------------------------------------------------


def seconds_cell(r: Result) -> str:
    return f"> {r.seconds:g} (stopped)" if r.is_lower_bound else f"{r.seconds:.3f}"


def runs_cell(r: Result) -> str:
    return "0, stopped" if r.is_lower_bound else str(len(r.times))


def result_rows(results: list[Result]) -> list[list[str]]:
    at_least = {True: ">= ", False: ""}
    return [
        [
            r.impl, MODE_NAMES[r.mode], seconds_cell(r), runs_cell(r),
            f"{at_least[r.is_lower_bound]}{r.peak_rss_mib:.0f}",
            f"{at_least[r.is_lower_bound]}{max(0.0, r.peak_rss_mib - r.rss_before_mib):.0f}",
        ]
        for r in results
    ]


RESULT_HEADERS = ["implementation", "pass", "median (s)", "runs", "peak RSS (MiB)", "RSS increase (MiB)"]


def speedup_lines(results: list[Result]) -> list[str]:
    """Per mode: the faster mambapy mode's time over ours (a lower bound when that mode was stopped)."""
    lines = []
    for mode in MODES:
        ours = next(r for r in results if r.mode == mode and r.impl == "ours")
        peer = min((r for r in results if r.mode == mode and r.impl != "ours"), key=lambda r: r.seconds)
        if ours.is_lower_bound:
            lines.append(f"{MODE_NAMES[mode]}: ours was stopped by --limit; no ratio")
            continue
        ratio = peer.seconds / ours.seconds
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        relation = ">=" if peer.is_lower_bound else "="
        lines.append(
            f"{MODE_NAMES[mode]}: {peer.impl} / ours {relation} {ratio:.1f}x "
            f"(target >= {TARGET_SPEEDUP:.0f}x: {verdict})"
        )
    return lines


def check_rows(diffs: dict[str, dict[str, float]]) -> list[list[str]]:
    return [[f"mambapy-{name}"] + [f"{v:.2e}" for v in d.values()] for name, d in diffs.items()]


CHECK_HEADERS = ["vs ours", "output max abs diff", "input grad max abs diff", "param grads max rel. diff"]


def markdown(
    args: argparse.Namespace, size: Size, check: Size, results: list[Result],
    diffs: dict[str, dict[str, float]], load: str,
) -> str:
    ratios = speedup_lines(results)
    return (
        "## Mamba on CPU: ours vs mambapy\n\n"
        f"d_model {D_MODEL}, {N_LAYERS} layers, batch {size.batch}, length {size.length}, float32. "
        "Forward under `torch.no_grad`; forward+backward with loss = mean(output^2). One warm-up call on "
        f"a {WARMUP_LENGTH}-step prefix, then the median of the timed runs (at most {args.repeats}, fewer "
        f"once a measurement's runs would exceed {args.budget:g} s; a run still going after {args.limit:g} s is "
        "stopped and reported as a lower bound). Each row ran in its own process; peak RSS is "
        "the peak during its timed runs, RSS increase is over the RSS right before them.\n"
        f"{NORM_NOTE}\n\n"
        + markdown_table(RESULT_HEADERS, result_rows(results))
        + "\nSpeed-up against the faster mambapy mode:\n\n"
        + "".join(f"- {line}\n" for line in ratios)
        + f"\nAgreement of each mixer with mambapy's MambaBlock holding the same weights "
        f"(batch {check.batch}, length {check.length}, all {N_LAYERS} layers; tolerance {TOLERANCE:g}):\n\n"
        + markdown_table(CHECK_HEADERS, check_rows(diffs))
        + "\n"
        + environment(str(args.threads), load)
    )


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test); no docs written without --out")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, at most (default 3)")
    p.add_argument(
        "--budget", type=float, default=30.0,
        help="seconds of timed runs per measurement: no further run once one more would exceed it,\n"
        "so the slow mambapy modes get a single run (default 30)",
    )
    p.add_argument(
        "--limit", type=float, default=150.0,
        help="seconds after which a measurement's timed runs are stopped and reported as a lower bound\n"
        "(mambapy's sequential forward+backward takes many minutes at full size; default 150)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--out", type=Path, default=None, help=f"markdown file to update (default {DEFAULT_DOC})")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.worker:
        size = Size(args.batch, args.length)
        emit(run_worker(*args.worker, size, args))
        return 0
    load = load_average()
    size, check = (QUICK, CHECK_QUICK) if args.quick else (FULL, CHECK_FULL)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})")
    print(f"d_model {D_MODEL}, {N_LAYERS} layers, batch {size.batch}, length {size.length}, float32")
    print(NORM_NOTE)

    print(f"\nCorrectness: mixers vs mambapy MambaBlock, batch {check.batch}, length {check.length}")
    diffs = check_mixers(check)
    print(text_table(CHECK_HEADERS, check_rows(diffs)))

    print("\nTiming (each in a fresh process):")
    results = [measure(impl, mode, size, args) for impl in IMPLS for mode in MODES]
    print()
    print(text_table(RESULT_HEADERS, result_rows(results)))
    print()
    print("\n".join(speedup_lines(results)))

    out = args.out or (None if args.quick else DEFAULT_DOC)
    if out is not None:
        write_section(out, SECTION, markdown(args, size, check, results, diffs, load))
    if check_failed(diffs):
        print(f"FAIL: a mixer differs from mambapy by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
