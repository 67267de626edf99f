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
  alone; the increase over the RSS right before the warm-up and timed runs is the working memory.
- One warm-up call, then the median of N timed calls (fewer for the slow sequential mode).
- Correctness: each of our mixers' weights is loaded into a mambapy ``MambaBlock`` (same
  parameter names and shapes); on the same input the outputs and input gradients must agree to
  1e-4 (max abs), or the script exits 1. Parameter gradients are compared too (max abs diff over
  the largest gradient entry).

Usage (from the repository root):
    PYTHONPATH=$PWD .venv/bin/python bench/bench_mamba.py            # full run, writes docs/BENCHMARKS.md
    PYTHONPATH=$PWD .venv/bin/python bench/bench_mamba.py --quick    # small smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchutil import DEFAULT_DOC, environment, markdown_table, median, text_table, time_calls, write_section
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
CHECK_FULL, CHECK_QUICK = Size(4, 512), Size(2, 64)


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


def run_worker(impl: str, mode: str, size: Size, repeats: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(impl)
    x = torch.randn(size.batch, size.length, D_MODEL)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    call = forward if mode == "fwd" else forward_backward
    call()  # warm-up; its one-time allocations (thread pools, kernels) stay out of the figures
    before = rss_mib()
    reset_peak_rss()
    times = time_calls(call, repeats, warmup=0)
    peak = peak_rss_mib()
    return {
        "impl": impl, "mode": mode, "times": times, "median": median(times),
        "rss_before_mib": before, "peak_rss_mib": peak, "threads": torch.get_num_threads(),
    }


def measure(impl: str, mode: str, size: Size, repeats: int, threads: int) -> dict[str, Any]:
    """Run one worker subprocess and return its JSON result."""
    cmd = [
        sys.executable, __file__, "--worker", impl, mode, "--batch", str(size.batch),
        "--length", str(size.length), "--repeats", str(repeats), "--threads", str(threads),
    ]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"worker {impl} {mode} failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {impl:14s} {mode:7s} median {result['median']:8.3f} s over {repeats} run(s)"
        f"  peak RSS {result['peak_rss_mib']:7.0f} MiB",
        flush=True,
    )
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


def result_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["impl"], MODE_NAMES[r["mode"]], f"{r['median']:.3f}", str(len(r["times"])),
            f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}",
        ]
        for r in results
    ]


RESULT_HEADERS = ["implementation", "pass", "median (s)", "runs", "peak RSS (MiB)", "RSS increase (MiB)"]


def speedups(results: list[dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """Per mode: (the faster mambapy mode, its median / ours)."""
    out = {}
    for mode in MODES:
        by_impl = {r["impl"]: r["median"] for r in results if r["mode"] == mode}
        peer = min((i for i in by_impl if i != "ours"), key=by_impl.__getitem__)
        out[mode] = (peer, by_impl[peer] / by_impl["ours"])
    return out


def speedup_lines(ratios: dict[str, tuple[str, float]]) -> list[str]:
    lines = []
    for mode, (peer, ratio) in ratios.items():
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        lines.append(
            f"{MODE_NAMES[mode]}: {peer} / ours = {ratio:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {verdict})"
        )
    return lines


def check_rows(diffs: dict[str, dict[str, float]]) -> list[list[str]]:
    return [[f"mambapy-{name}"] + [f"{v:.2e}" for v in d.values()] for name, d in diffs.items()]


CHECK_HEADERS = ["vs ours", "output max abs diff", "input grad max abs diff", "param grads max rel. diff"]


def markdown(
    size: Size, check: Size, threads: int, results: list[dict[str, Any]], diffs: dict[str, dict[str, float]]
) -> str:
    ratios = speedup_lines(speedups(results))
    return (
        "## Mamba on CPU: ours vs mambapy\n\n"
        f"d_model {D_MODEL}, {N_LAYERS} layers, batch {size.batch}, length {size.length}, float32. "
        "Forward under `torch.no_grad`; forward+backward with loss = mean(output^2). One warm-up, then "
        "the median of the timed runs; each row ran in its own process, so peak RSS is that "
        "measurement's alone (RSS increase: over the RSS right before the warm-up).\n"
        f"{NORM_NOTE}\n\n"
        + markdown_table(RESULT_HEADERS, result_rows(results))
        + "\nSpeed-up against the faster mambapy mode:\n\n"
        + "".join(f"- {line}\n" for line in ratios)
        + f"\nAgreement of each mixer with mambapy's MambaBlock holding the same weights "
        f"(batch {check.batch}, length {check.length}, all {N_LAYERS} layers; tolerance {TOLERANCE:g}):\n\n"
        + markdown_table(CHECK_HEADERS, check_rows(diffs))
        + "\n"
        + environment(str(threads))
    )


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and single runs (smoke test); writes no docs")
    p.add_argument("--repeats", type=int, default=None, help="timed runs for ours and mambapy-pscan (default 3)")
    p.add_argument("--seq-repeats", type=int, default=None, help="timed runs for mambapy-seq (default 1)")
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
        print(json.dumps(run_worker(*args.worker, size, args.repeats, args.threads)))
        return 0
    size, check = (QUICK, CHECK_QUICK) if args.quick else (FULL, CHECK_FULL)
    repeats = args.repeats or (1 if args.quick else 3)
    seq_repeats = args.seq_repeats or 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})")
    print(f"d_model {D_MODEL}, {N_LAYERS} layers, batch {size.batch}, length {size.length}, float32")
    print(NORM_NOTE)

    print(f"\nCorrectness: mixers vs mambapy MambaBlock, batch {check.batch}, length {check.length}")
    diffs = check_mixers(check)
    print(text_table(CHECK_HEADERS, check_rows(diffs)))

    print("\nTiming (each in a fresh process):")
    results = [
        measure(impl, mode, size, seq_repeats if impl == "mambapy-seq" else repeats, args.threads)
        for impl in IMPLS
        for mode in MODES
    ]
    print()
    print(text_table(RESULT_HEADERS, result_rows(results)))
    print()
    print("\n".join(speedup_lines(speedups(results))))

    out = args.out or (None if args.quick else DEFAULT_DOC)
    if out is not None:
        write_section(out, SECTION, markdown(size, check, args.threads, results, diffs))
    if check_failed(diffs):
        print(f"FAIL: a mixer differs from mambapy by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
