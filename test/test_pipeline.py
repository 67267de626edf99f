"""The shared pipeline: causal alignment, sample-by-sample == whole arrays, episodes, filter."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from hiss_ros.errors import ConfigError
from hiss_ros.pipeline import FilterConfig, Normalization, Pipeline, PipelineConfig

MS = 1_000_000


def two_streams(seconds=2.0, imu_hz=200, tactile_hz=50, jitter_ms=1.0, seed=0):
    """A jittery 200 Hz 3-channel stream and a 50 Hz 2-channel stream, stamps in ns."""
    rng = np.random.default_rng(seed)

    def stamps(rate):
        t = np.arange(int(seconds * rate)) * (1e9 / rate) + rng.uniform(0, jitter_ms * MS, int(seconds * rate))
        return np.sort(t.astype(np.int64)) + 1_000_000_000

    a_t, b_t = stamps(imu_hz), stamps(tactile_hz)
    return [(a_t, rng.standard_normal((len(a_t), 3))), (b_t, rng.standard_normal((len(b_t), 2)))]


def cfg(**kw):
    return PipelineConfig(**{"input_dims": (3, 2), "input_rate_hz": 200, "output_rate_hz": 20, **kw})


def push_all(pipe, streams):
    """Feed samples one at a time in stamp order, as a node receives them."""
    events = sorted((int(t), i, k) for i, (ts, _) in enumerate(streams) for k, t in enumerate(ts))
    return [c for t, i, k in events for c in pipe.push(i, t, streams[i][1][k])]


@pytest.mark.parametrize("filt", [None, FilterConfig(cutoff_hz=30.0, order=4)])
def test_sample_by_sample_equals_whole_arrays(filt):
    streams = two_streams()
    norm = Normalization(np.arange(5.0), np.arange(1.0, 6.0), np.zeros(1), np.ones(1))
    online = push_all(Pipeline(cfg(filter=filt), norm), streams)
    offline = Pipeline(cfg(filter=filt), norm).process(streams)
    assert len(offline) == 1
    assert [c.stamp_ns for c in online] == offline[0].stamps_ns.tolist()
    np.testing.assert_array_equal(np.stack([c.x for c in online]), offline[0].x)


def test_chunks_are_causal_zero_order_hold_on_the_clock():
    streams = two_streams()
    (ep,) = Pipeline(cfg()).process(streams)
    assert ep.x.shape[1:] == (10, 5)
    a_t, a_v = streams[0]
    b_t, b_v = streams[1]
    period = 1e9 / 200
    for k in (0, 5, len(ep.stamps_ns) - 1):
        for j in range(10):
            t = ep.stamps_ns[k] - round((9 - j) * period)  # tick j of chunk k
            ia = np.searchsorted(a_t, t, side="right") - 1  # latest sample at or before t
            ib = np.searchsorted(b_t, t, side="right") - 1
            np.testing.assert_allclose(ep.x[k, j], np.concatenate([a_v[ia], b_v[ib]]).astype(np.float32))


def test_future_samples_never_change_earlier_chunks():
    streams = two_streams()
    (ep,) = Pipeline(cfg()).process(streams)
    cut = ep.stamps_ns[7]
    changed = [(t, np.where((t > cut)[:, None], v + 100.0, v)) for t, v in streams]
    (ep2,) = Pipeline(cfg()).process(changed)
    np.testing.assert_array_equal(ep.x[:8], ep2.x[:8])
    assert not np.array_equal(ep.x[8:], ep2.x[8:])


def test_chunk_stamp_is_last_tick_time_and_clock_is_fixed_rate():
    (ep,) = Pipeline(cfg()).process(two_streams())
    np.testing.assert_array_equal(np.diff(ep.stamps_ns), 50 * MS)


def test_filter_matches_scipy_on_the_aligned_signal():
    streams = two_streams()
    raw = Pipeline(cfg()).process(streams)[0].x.reshape(-1, 5).astype(np.float64)
    filt = FilterConfig(cutoff_hz=20.0, order=2)
    got = Pipeline(cfg(filter=filt)).process(streams)[0].x.reshape(-1, 5)
    sos = signal.butter(2, 20.0, fs=200, output="sos")
    assert got.shape == raw.shape
    assert np.abs(got - raw).max() > 1e-3  # it filters
    assert np.abs(np.diff(got, axis=0)).mean() < np.abs(np.diff(raw, axis=0)).mean()  # it smooths
    # Against scipy: the aligned rows filtered from the episode start, the filter starting in
    # steady state at the first row, give the same numbers.
    zi = signal.sosfilt_zi(sos)[:, :, None] * raw[0]
    ref, _ = signal.sosfilt(sos, raw, axis=0, zi=zi)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_gap_and_time_going_back_start_new_episodes():
    a, b = two_streams(seconds=3.0)
    a_t, a_v = a
    gap = a_t.copy()
    gap[300:] += 2_000 * MS  # a 2 s hole at 1.5 s
    pipe = Pipeline(cfg(max_gap_s=0.5))
    b_t = np.concatenate([b[0][b[0] < gap[299]], b[0][b[0] >= gap[299]] + 2_000 * MS])
    eps = pipe.process([(gap, a_v), (b_t, b[1][: len(b_t)])])
    assert len(eps) == 2
    assert pipe.counters["gap"] == 1
    assert eps[1].stamps_ns[0] > gap[300]

    pipe = Pipeline(cfg())
    first = push_all(pipe, [(a_t[:200], a_v[:200]), (b[0][:50], b[1][:50])])
    later = push_all(pipe, [(a_t[:200] - 500 * MS, a_v[:200]), (b[0][:50] - 500 * MS, b[1][:50])])
    assert pipe.counters["time_backwards"] == 1
    assert first and later and later[0].episode == first[-1].episode + 1


def test_a_late_clock_sample_is_dropped_a_jump_back_starts_a_new_episode():
    pipe = Pipeline(cfg(max_gap_s=0.5))
    for k in range(20):
        pipe.push(0, 1_000 * MS + k * 5 * MS, [k, 0, 0])
    pipe.push(1, 1_000 * MS, [0, 0])
    assert pipe.push(0, 1_050 * MS, [0, 0, 0]) == []  # 45 ms late: a reordered sample, not a new time line
    assert (pipe.counters["out_of_order"], pipe.counters["time_backwards"], pipe.episode) == (1, 0, 0)
    pipe.push(0, 400 * MS, [0, 0, 0])  # 0.7 s back: a restarted clock
    assert (pipe.counters["time_backwards"], pipe.episode) == (1, 1)


def test_normalization_is_checked_and_round_trips():
    norm = Normalization.fit(np.array([[1.0, 5.0], [3.0, 5.0]]), np.array([[2.0], [4.0]]))
    np.testing.assert_array_equal(norm.input_std, [1.0, 1.0])  # a constant channel keeps std 1
    again = Normalization.from_dict(norm.to_dict())
    assert all(np.array_equal(getattr(again, k), getattr(norm, k)) for k in Normalization.KEYS)
    np.testing.assert_allclose(norm.physical(norm.outputs(np.array([[7.0]]))), [[7.0]])
    with pytest.raises(ConfigError, match="input_std: every std must be > 0"):
        Normalization(np.zeros(2), np.array([1.0, 0.0]), np.zeros(1), np.ones(1))
    with pytest.raises(ConfigError, match="output_mean: expected a non-empty list of finite numbers"):
        Normalization(np.zeros(2), np.ones(2), np.array([np.nan]), np.ones(1))
    with pytest.raises(ConfigError, match="output_mean has 2 channels, output_std 1"):
        Normalization(np.zeros(2), np.ones(2), np.zeros(2), np.ones(1))
    with pytest.raises(ConfigError, match=r"expected the keys \['input_mean'"):
        Normalization.from_dict({"input_mean": [0.0]})


def test_bad_samples_are_counted_not_fatal():
    pipe = Pipeline(cfg())
    assert pipe.push(0, 1_000 * MS, [np.nan, 0, 0]) == []
    assert pipe.push(0, 1_000 * MS, [1, 2]) == []
    assert pipe.push(7, 1_000 * MS, [1, 2, 3]) == []
    pipe.push(0, 1_000 * MS, [1, 2, 3])
    pipe.push(0, 1_000 * MS, [1, 2, 3])
    pipe.push(1, 1_000 * MS, [1, 2])
    pipe.push(1, 999 * MS, [1, 2])
    assert pipe.counters["nonfinite"] == 1
    assert pipe.counters["wrong_size"] == 1
    assert pipe.counters["unknown_stream"] == 1
    assert pipe.counters["duplicate"] == 1
    assert pipe.counters["out_of_order"] == 1


@pytest.mark.parametrize("kw, message", [
    ({"output_rate_hz": 30}, "must be a whole number"),
    ({"input_dims": (3, 0)}, "input_dims"),
    ({"filter": FilterConfig(cutoff_hz=150.0)}, "below Nyquist"),
    ({"max_gap_s": 0}, "max_gap_s = 0"),
])
def test_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**kw)


def test_absurd_finite_values_are_rejected_against_the_training_statistics():
    norm = Normalization(np.zeros(5), np.full(5, 2.0), np.zeros(1), np.ones(1))
    pipe = Pipeline(cfg(), norm, max_abs_z=1e3)
    pipe.push(1, 1_000 * MS, [0.0, 1e30])  # a saturated or broken sensor: finite, but 5e29 sigma
    pipe.push(0, 1_000 * MS, [1e30, 0, 0])
    assert pipe.counters["out_of_range"] == 2 and pipe.counters["accepted"] == 0
    pipe.push(0, 1_001 * MS, [1999.0, -1999.0, 0])  # within 1e3 sigma: used
    assert pipe.counters["accepted"] == 1
    raw = Pipeline(cfg())  # without statistics (fitting them): no bound
    raw.push(0, 1_000 * MS, [1e30, 0, 0])
    assert raw.counters["accepted"] == 1


def test_each_rejected_sample_counts_under_one_reason_in_a_fixed_order():
    """nonfinite before duplicate / out_of_order before out_of_range, with or without the
    training statistics (the live path checks the range first, and must classify as the bag path)."""
    for norm in (Normalization(np.zeros(5), np.ones(5), np.zeros(1), np.ones(1)), None):
        pipe = Pipeline(cfg(), norm, max_abs_z=10)
        pipe.push(0, 1_000 * MS, [0.0, 0, 0])
        pipe.push(0, 1_000 * MS, [np.nan, 0, 0])  # a NaN with a repeated stamp: nonfinite
        pipe.push(0, 999 * MS, [np.inf, 0, 0])  # late and infinite: nonfinite
        pipe.push(0, 999 * MS, [100.0, 0, 0])  # late and out of range: out_of_order
        pipe.push(0, 1_000 * MS, [0.0, 0, 0])  # the same stamp again: duplicate
        pipe.push(0, 1_001 * MS, [100.0, 0, 0])  # in order, out of range: out_of_range (with statistics)
        pipe.push(0, 1_002 * MS, [9.0, 0, 0])
        want = {"nonfinite": 2, "out_of_order": 1, "duplicate": 1, "out_of_range": 1 if norm else 0,
                "accepted": 2 if norm else 3}
        assert {k: pipe.counters[k] for k in want} == want, norm


def clock_and_second(pipe, seconds=1.0, start_ns=10**12):
    """200 Hz clock + 50 Hz second stream (1 ms before the clock's ticks) from ``start_ns``: the
    chunks they complete."""
    out = []
    for k in range(int(seconds * 200)):
        t = start_ns + k * 5 * MS
        if k % 4 == 0:
            out += pipe.push(1, t - MS, [0.5, 0.5])
        out += pipe.push(0, t, [1.0, 2.0, 3.0])
    return out


@pytest.mark.parametrize("first", ["before the clock starts", "while it runs"])
def test_a_second_stream_sample_on_another_time_line_is_dropped_not_waited_for(first):
    """One tactile sample stamped far ahead (a receipt stamp on the node clock against IMU header
    stamps) once held every later sample back: no estimate for good, diagnostics OK."""
    pipe = Pipeline(cfg())
    if first == "while it runs":
        assert len(clock_and_second(pipe, 0.5, start_ns=10**12 - 5 * 10**8)) == 10  # then seamlessly on
    pipe.push(1, 10**18, [9.0, 9.0])
    chunks = clock_and_second(pipe)
    assert len(chunks) >= 19 and pipe.counters["ahead_of_clock"] == 1
    assert all(c.x[:, 3:].max() < 1 for c in chunks)  # the far-ahead value never reached a chunk


def test_a_jump_back_in_time_still_refuses_absurd_values():
    norm = Normalization(np.zeros(5), np.ones(5), np.zeros(1), np.ones(1))
    pipe = Pipeline(cfg(), norm)
    clock_and_second(pipe, 0.5)
    pipe.push(0, 10**9, [1e300, 1e300, 1e300])  # a new time line, and a sensor fault
    assert pipe.counters["time_backwards"] == 1 and pipe.counters["out_of_range"] == 1
    chunks = clock_and_second(pipe, 0.5, start_ns=2 * 10**9)
    assert chunks and all(np.isfinite(c.x).all() and np.abs(c.x).max() < 10 for c in chunks)


def test_samples_lost_while_the_clock_lags_end_the_episode_instead_of_stitching_a_chunk():
    pipe = Pipeline(PipelineConfig((1, 1), 400, 40, 0.5))
    for k in range(15):
        pipe.push(0, 10**9 + k * 2_500_000, [0.0]) + pipe.push(1, 10**9 + k * 2_500_000, [0.0])
    for k in range(5000):  # the second stream runs ahead at 20 kHz (within a gap of the clock), the clock late
        pipe.push(1, 10**9 + 37_500_000 + k * 50_000, [1.0])
    assert pipe.counters["held_overflow"] > 5000 - 4096  # counted, not silent
    chunks = []
    for k in range(15, 2000):  # the clock catches up; the second stream goes on at its own pace
        t = 10**9 + k * 2_500_000
        chunks += pipe.push(0, t, [0.0]) + (pipe.push(1, t + 300 * 10**6, [2.0]) if k % 4 == 0 else [])
    assert pipe.counters["stream_silent"] >= 1
    assert chunks and all(c.episode >= 1 for c in chunks)  # no chunk of the first episode spans the hole


@pytest.mark.parametrize("stream, stamp, values, counter", [
    (0, 10**9, "abc", "not_numbers"),
    (0, 10**9, {"a": 1}, "not_numbers"),
    (0, 10**9, [[1, 2], [3]], "not_numbers"),
    (0, 10**9, None, "wrong_size"),
    (0, 10**9, np.arange(6.0).reshape(3, 2), "wrong_size"),
    (9, 10**9, "abc", "unknown_stream"),
    (None, 10**9, [1, 2, 3], "unknown_stream"),
    (1.5, 10**9, [1, 2, 3], "unknown_stream"),
    (True, 10**9, [1, 2], "unknown_stream"),
    (0, float("nan"), [1, 2, 3], "bad_stamp"),
    (0, None, [1, 2, 3], "bad_stamp"),
    (0, 1.5e9, [1, 2, 3], "bad_stamp"),
    (0, np.int64(2**63 - 1), [1, 2, 3], "bad_stamp"),
    (0, 2**31 * 10**9, [1, 2, 3], "bad_stamp"),  # past ROS time's int32 seconds (a stamp no estimate could carry)
    (0, -(2**31) * 10**9 - 1, [1, 2, 3], "bad_stamp"),
])
def test_values_streams_and_stamps_of_the_wrong_type_are_counted_not_fatal(stream, stamp, values, counter):
    pipe = Pipeline(cfg())
    assert pipe.push(stream, stamp, values) == []
    assert pipe.counters == {counter: 1}
    assert len(clock_and_second(pipe, 0.5)) == 10  # and the pipeline goes on as if it never came


def test_a_tie_with_the_clock_sample_gives_the_same_chunks_whichever_arrives_first():
    """A second-stream sample stamped exactly at the clock sample that emits a tick (a simulator's
    sensors, one driver's synchronised streams) enters from the next tick on: as ``process``
    (stamp order, stream 0 first at a tie) has it, and live whichever of the two arrives first."""
    ticks = 10**12 + np.arange(200) * 5 * MS
    clock = (ticks, np.random.default_rng(0).standard_normal((200, 3)))
    second = (ticks[::4], np.arange(100.0).reshape(50, 2))  # tied with every 4th clock sample
    offline = Pipeline(cfg()).process([clock, second])[0]
    for second_first in (True, False):
        pipe, chunks = Pipeline(cfg()), []
        for k, t in enumerate(ticks):
            pushes = [(0, t, clock[1][k])] + ([(1, t, second[1][k // 4])] if k % 4 == 0 else [])
            for stream, stamp, v in (reversed(pushes) if second_first else pushes):
                chunks += pipe.push(stream, int(stamp), v)
        np.testing.assert_array_equal(np.array([c.stamp_ns for c in chunks]), offline.stamps_ns)
        np.testing.assert_array_equal(np.stack([c.x for c in chunks]), offline.x)
    assert len(np.unique(offline.x[:, :, 3])) > 40  # the second stream's every sample reached the chunks


def test_samples_dropped_when_the_clock_starts_are_counted_once():
    pipe = Pipeline(cfg())
    pipe.push(1, 10**12, [0.5, 0.5])
    pipe.push(1, 10**12 + 10**10, [0.5, 0.5])  # 10 s ahead of where the clock will start
    pipe.push(0, 10**12, [1.0, 2.0, 3.0])
    assert pipe.counters == {"accepted": 2, "ahead_of_clock": 1, "ticks_waiting": 1}
