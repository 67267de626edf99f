"""Why the model step costs more in the estimator node than back to back: caches lost while idle.

In the node every step follows about a millisecond of idle (it waits for the next chunk of IMU
samples). This script times the same work in five conditions, in one process pinned to one core:
- ``warm``: right after the same call (back to back);
- ``after 10 ms sleep``: the node's situation, exaggerated;
- ``sleep, then 2 ms busy``: the core kept busy for 2 ms before the call, touching none of its data
  (if the clock ramping down while idle were the cause, this would be fast again);
- ``sleep, then data read``: the call's data (matrix, or the model's weights) read once before it
  (if lost data caches were the cause, this would be fast again);
- ``64 MB read, no sleep``: no idle at all, but the caches (L2 and the 32 MB L3) flushed by reading
  64 MB first, then 0.5 ms busy (as in the 2 ms condition, touching none of the call's data): what
  lost caches alone cost;
- ``sleep, the call once, 1 ms sleep``: a warm-up call (the model step on a scratch state) about
  a millisecond before the timed one, as a node could make while it waits for a chunk's last
  sample: what such a warm-up would buy, and (``a warm-up call itself``, after the 10 ms sleep) what
  it would cost.
Work timed: a 330 x 330 float32 matrix-vector product (436 KB of data, memory bound) and one step
of the shipped ``contact`` model (``StepRunner``, eager, one torch thread).

Usage (from the repository root; a quiet machine):
    PYTHONPATH=$PWD .venv/bin/python bench/bench_cold_cache.py          # writes docs/BENCHMARKS.md
    PYTHONPATH=$PWD .venv/bin/python bench/bench_cold_cache.py --quick  # fewer repeats, writes nothing
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchutil import DEFAULT_DOC, environment, load_average, markdown_table, median, text_table, write_section

from hiss_ros.models import StepRunner
from hiss_ros.serving import load_model

SECTION = "bench_cold_cache"


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def conditions(touch: Callable[[], object], warm_up: Callable[[], object],
               junk: np.ndarray) -> dict[str, Callable[[], None]]:
    """What runs before each timed call (a warm-up call precedes every one)."""
    return {
        "warm (back to back)": lambda: None,
        "after 10 ms sleep": lambda: time.sleep(0.01),
        "sleep, then 2 ms busy": lambda: (time.sleep(0.01), busy(0.002)),
        "sleep, then data read": lambda: (time.sleep(0.01), touch()),
        "64 MB read, no sleep": lambda: (junk.sum(), busy(0.0005)),
        "sleep, the call once, 1 ms sleep": lambda: (time.sleep(0.01), warm_up(), time.sleep(0.001)),
    }


def timed(work: Callable[[], object], before: Callable[[], None], repeats: int) -> float:
    """Median microseconds of ``work`` right after ``before``."""
    times = []
    for _ in range(repeats):
        work()
        before()
        t0 = time.perf_counter()
        work()
        times.append((time.perf_counter() - t0) * 1e6)
    return median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 repeats, write nothing")
    p.add_argument("--doc", default=str(DEFAULT_DOC))
    args = p.parse_args(argv)
    repeats = 20 if args.quick else 300
    load = load_average()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    matrix, vector = rng.random((330, 330), dtype=np.float32), rng.random(330, dtype=np.float32)
    junk = rng.random(16_000_000, dtype=np.float32)  # 64 MB
    model = load_model("contact").model.eval()
    runner = StepRunner(model)
    x = torch.randn(1, model.config.chunk, model.config.input_dim)
    state, scratch = [model.init_state(batch_size=1)], model.init_state(batch_size=1)
    weights = list(model.state_dict().values())

    def step() -> None:
        with torch.inference_mode():
            _, state[0] = runner.step(x, state[0])

    def warm_up_step() -> None:  # the same work, on a state nobody carries
        with torch.inference_mode():
            runner.step(x, scratch)

    works = {"330x330 matrix-vector (us)": (lambda: matrix @ vector, lambda: (matrix.sum(), vector.sum()),
                                            lambda: matrix @ vector),
             "contact model step (us)": (step, lambda: [w.sum() for w in weights], warm_up_step)}
    results = {name: {c: timed(work, before, repeats) for c, before in conditions(touch, warm_up, junk).items()}
               for name, (work, touch, warm_up) in works.items()}
    for name, (_, _, warm_up) in works.items():  # the warm-up call's own cost, after the same idle
        results[name]["a warm-up call itself (after 10 ms sleep)"] = timed(warm_up, lambda: time.sleep(0.01), repeats)
    rows = [[c] + [f"{results[name][c]:.1f}" for name in works] for c in results[next(iter(works))]]
    headers = ["before the call", *works]
    print(text_table(headers, rows))
    if args.quick:
        return 0
    body = ("## Cold caches: the same call after idle\n\n" + environment("1 (pinned to one core)", load) +
            f"- Median of {repeats} calls each\n\n" + markdown_table(headers, rows) +
            "\nHow to read it: 'sleep, then 2 ms busy' puts the clock back up without touching the call's data "
            "(as fast as 'warm' if a slowed clock were the cause); 'sleep, then data read' brings its data back "
            "(the matrix, or the model's weights); '64 MB read, no sleep' is the cost of flushed caches alone, "
            "with no idle at all; 'sleep, the call once, 1 ms sleep' is what a warm-up call a millisecond before "
            "would buy, at the cost of the call in the last row on top of each step.\n")
    write_section(Path(args.doc), SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
