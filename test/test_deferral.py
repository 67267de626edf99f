"""The estimator's batching (``hiss_ros.nodes.deferral``): samples held back until a chunk may be due
give the very same chunks, from the very same samples, as pushing each on arrival."""

from __future__ import annotations

import numpy as np
import pytest

from hiss_ros.nodes.deferral import Deferral
from hiss_ros.pipeline import Pipeline, PipelineConfig

MS = 1_000_000
T0 = 5_000_000_000


def arrivals(seed: int = 0) -> list[tuple[int, int, np.ndarray, int]]:
    """(stream, stamp, values, receipt) in arrival order: a 1 kHz clock stream with jitter and a 100 Hz
    second stream; then a gap, reordered and duplicated clock samples, NaN, the clock stream silent
    while the other goes on, and time jumping back (a looped bag)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int, np.ndarray, int]] = []

    def run(start: int, n: int, clock: bool = True) -> None:
        for k in range(n):
            t = start + k * MS + int(rng.uniform(0, 0.3 * MS))
            if clock:
                out.append((0, t, rng.standard_normal(3), 0))
            if k % 10 == 3:
                out.append((1, t + MS // 2, rng.standard_normal(2), 0))

    run(T0, 600)                                     # clean: 0.6 s
    run(T0 + 800 * MS, 300)                          # after a 200 ms gap (max_gap 50 ms)
    last = out[-1] if out[-1][0] == 0 else out[-2]
    out += [(0, last[1] - 3 * MS, rng.standard_normal(3), 0),      # late
            (0, last[1], rng.standard_normal(3), 0),               # duplicate stamp
            (0, last[1] + MS, np.full(3, np.nan), 0)]              # not finite
    run(T0 + 1_110 * MS, 200, clock=False)           # the clock stream silent for 200 ms
    run(T0 + 1_400 * MS, 300)
    run(T0 - 2_000 * MS, 400)                        # time jumps back 3.7 s
    # receipt times: strictly increasing, about the stamps' spacing, in arrival order
    now = 10 * T0
    for j, (i, t, v, _) in enumerate(out):
        now += int(rng.uniform(0.05, 1.0) * MS)
        out[j] = (i, t, v, now)
    return out


def config() -> PipelineConfig:
    return PipelineConfig(input_dims=(3, 2), input_rate_hz=400, output_rate_hz=40, max_gap_s=0.05)


def immediate(samples) -> list[tuple[int, int, int, bytes]]:
    """(sample index, chunk stamp, episode, chunk bytes) pushing each sample as it arrives."""
    pipe = Pipeline(config())
    return [(j, c.stamp_ns, c.episode, c.x.tobytes())
            for j, (i, t, v, _) in enumerate(samples) for c in pipe.push(i, t, v)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_samples_give_the_same_chunks_from_the_same_sample_as_pushing_each_on_arrival(seed):
    samples = arrivals(seed)
    pipe = Pipeline(config())
    held = Deferral(pipe, margin_ns=2 * MS, max_held=64, max_age_ns=50 * MS)
    got, handed, most, batches = [], [], 0, []
    for j, (i, t, _, now) in enumerate(samples):
        now_items = held.offer(i, t if i == 0 else 0, now, j)
        most = max(most, len(held.held))
        batches.append(len(now_items))
        for k in now_items:
            handed.append(k)
            chunks = pipe.push(samples[k][0], samples[k][1], samples[k][2])
            assert not chunks or k == j, f"held sample {k} completed a chunk (handed back with {j})"
            got += [(k, c.stamp_ns, c.episode, c.x.tobytes()) for c in chunks]
    handed += held.flush()
    assert handed == list(range(len(samples))), "every sample handed back once, in arrival order"
    assert not held.held and held.flush() == []
    want = immediate(samples)
    assert got == want and len({e for _, _, e, _ in want}) >= 3  # the gap and the jump started episodes
    # It does batch: most samples wait, in batches of about a chunk's worth (25 clock samples here).
    assert sum(b == 0 for b in batches) > 0.7 * len(samples) and most <= 64
    assert np.median([b for b in batches if b > 1]) >= 15
    # The batch goes a margin ahead: the sample that completes a chunk comes almost alone (clean part).
    clean = [batches[j] for j, *_ in want if samples[j][1] < T0 + 590 * MS]
    assert len(clean) >= 20 and max(clean) <= 3


def test_a_silent_clock_stream_holds_the_others_only_so_long_and_unknown_stamps_never_wait():
    pipe = Pipeline(config())
    held = Deferral(pipe, margin_ns=2 * MS, max_held=8, max_age_ns=30 * MS)
    # Only the second stream arrives: held, up to max_held samples ...
    out = [len(held.offer(1, 0, T0 + k * MS, k)) for k in range(9)]
    assert out == [0] * 8 + [9]
    # ... and none older than max_age_ns.
    out = [len(held.offer(1, 0, T0 + 100 * MS + k * 10 * MS, k)) for k in range(5)]
    assert out == [0, 0, 0, 0, 5]
    # A sample the node cannot say may wait (no stamp) takes the held ones with it.
    held.offer(1, 0, T0 + 200 * MS, "a")
    assert held.offer(0, None, T0 + 201 * MS, "b") == ["a", "b"]
    assert held.offer(0, None, T0 + 202 * MS, "c") == ("c",)
