"""When the estimator takes its inputs (``hiss_ros.nodes.pacing``): just before the sample that
completes the next chunk arrives, predicted from the clock stream's stamps and receipts."""

from __future__ import annotations

import numpy as np

from hiss_ros.nodes.pacing import JUMP_NS, TIMER_NS, Pacer
from hiss_ros.pipeline import Pipeline, PipelineConfig

MS = 1_000_000
T0 = 7_000_000_000


def clock(n, delays, start=T0, period=MS):
    """A 1 kHz clock stream (400 Hz input clock, chunk 10) pushed into a pipeline, each sample seen
    by a pacer with its receipt ``delays[k]`` after its stamp; (pipeline, pacer, last stamp)."""
    pipe = Pipeline(PipelineConfig((3,), 400, 40, 0.5))
    pacer = Pacer(pipe, period)
    for k in range(n):
        t = start + k * period
        pipe.push(0, t, np.zeros(3))
        pacer.seen(t, t + int(delays[k]))
    return pipe, pacer, start + (n - 1) * period


def test_the_next_chunk_is_expected_after_the_least_recent_delay():
    delays = [300_000, 250_000, 4 * MS, 280_000, 260_000]  # one sample came 4 ms late
    pipe, pacer, _ = clock(5, delays)
    assert pipe.next_chunk_ns() == T0 + 22_500_000  # the 10th tick at 400 Hz
    least = 250_000 + 3 * pacer.drift_ns  # the least delay, risen by the drift allowance a sample since
    assert pacer.delay_ns == least
    assert pacer.expected_ns() == pipe.next_chunk_ns() + least


def test_a_new_time_line_is_followed_a_late_sample_is_not():
    _, pacer, last = clock(20, [200_000] * 20)
    pacer.seen(last + MS, last + MS + 50 * MS)  # 50 ms late: a hiccup, not followed
    assert pacer.delay_ns == 200_000 + pacer.drift_ns
    pacer.seen(last - 3_000 * MS, last + 2 * MS)  # stamps 3 s back (a looped bag): another time line
    assert pacer.delay_ns == 3_002 * MS > JUMP_NS


def test_it_waits_only_around_the_expected_arrival():
    _, pacer, _ = clock(5, [200_000] * 5)
    expected = pacer.expected_ns()
    margin = pacer.margin_ns
    assert pacer.wait_until(expected - margin - 1) is None  # too early: take and go back to the executor
    assert pacer.wait_until(expected - margin) == expected + pacer.slack_ns
    assert pacer.wait_until(expected + pacer.slack_ns - 1) == expected + pacer.slack_ns
    assert pacer.wait_until(expected + pacer.slack_ns) is None  # overdue: poll instead


def test_wakes_before_the_chunk_else_waits_for_the_clock_stream_backing_off():
    pipe = Pipeline(PipelineConfig((3,), 400, 40, 0.5))
    pacer = Pacer(pipe, MS, idle_ns=20 * MS)
    assert pacer.next_wake(T0) is None  # no clock yet: no schedule
    assert [pacer.backoff_ns() for _ in range(7)] == [MS, 2 * MS, 4 * MS, 8 * MS, 16 * MS, 20 * MS, 20 * MS]
    pipe.push(0, T0, np.zeros(3))
    pacer.seen(T0, T0 + 100_000)
    expected = pacer.expected_ns()
    assert pacer.next_wake(T0 + MS) == expected - pacer.margin_ns  # on schedule ...
    assert pacer.backoff_ns() == MS  # ... which starts the backing off afresh
    assert pacer.next_wake(expected - pacer.margin_ns) is None  # imminent (waited for), or overdue:
    assert pacer.next_wake(expected + pacer.slack_ns) is None  # no schedule


def test_the_margin_follows_the_work_of_a_wake_up_within_a_chunk():
    pipe = Pipeline(PipelineConfig((3,), 400, 40, 0.5))
    pacer = Pacer(pipe, MS)
    for _ in range(100):
        pacer.worked(400_000)
    assert abs(pacer.margin_ns - (2 * 400_000 + TIMER_NS)) < 20_000
    for _ in range(100):
        pacer.worked(50 * MS)  # never more than a chunk ahead
    assert pacer.margin_ns == pipe.span_ns(10)


def test_other_work_is_put_off_to_mid_way_between_two_chunks():
    """The diagnostics report, due just before a chunk's take or just after the last estimate,
    is put off until mid-way to the next chunk; in the quiet time between, or off schedule, it runs."""
    pipe = Pipeline(PipelineConfig((3,), 400, 40, 0.5))
    pacer = Pacer(pipe, MS)
    assert pacer.defer_ns(T0, MS) == 0  # no schedule yet
    pipe, pacer, _ = clock(5, [200_000] * 5)
    expected, span, length = pacer.expected_ns(), 25 * MS, MS
    mid = expected - span // 2
    assert pacer.defer_ns(mid, length) == 0  # quiet
    assert pacer.defer_ns(expected - pacer.margin_ns - length - 1, length) == 0  # ends before the take
    before_take = expected - pacer.margin_ns - length
    assert before_take + pacer.defer_ns(before_take, length) == mid + span  # mid-way after the next chunk
    just_after = expected - span + MS  # the last chunk's estimate is on its way
    assert just_after + pacer.defer_ns(just_after, length) == mid
    assert pacer.defer_ns(expected, length) == 0  # the sample is overdue: no schedule to keep clear of
    assert pacer.defer_ns(before_take, span) == 0  # longer than the quiet time: no use waiting
    assert pacer.defer_ns(expected - 3 * span, length) == 0  # no chunk near
