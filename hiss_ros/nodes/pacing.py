"""When the estimator takes its inputs (``intake:=paced``): once per chunk, just before the sample
that completes the chunk arrives, instead of on every message.

At IMU 1 kHz + tactile 100 Hz a node that takes each message as it arrives is woken 1,100 times
a second, and on the benchmark machine those wake-ups alone (rclpy's events executor, callbacks
that only count) cost 10 % of a core, against 4.6 % for the same subscriptions drained every 25 ms
(docs/BENCHMARKS.md). The middleware queues the messages meanwhile and notes when each arrived,
so nothing is lost or retimed: the node processes them in arrival order, with their receipt
times, as before; only when it does so changes.

``Pacer`` predicts from the clock stream's samples (their pipeline stamps and their receipts):
the sample that completes the next chunk (stamped ``Pipeline.next_chunk_ns`` or later) arrives
after the least delay seen lately, stamps advancing as the steady clock does. The node takes what
has come shortly before that (``margin_ns``: twice what processing it has cost lately, and a
timer's lateness), then waits for that sample event-driven, at most ``slack_ns`` past the expected
arrival. With no prediction (no clock yet) or an overdue sample (a late or silent sensor, a replay
slower than real time) it waits for the clock stream event-driven too, letting the executor run in
between, for one clock-stream period, then twice that, up to ``idle_ns``. A replay faster than real
time is estimated late, never wrongly. No ROS here.
"""

from __future__ import annotations

from hiss_ros.pipeline import Pipeline

TIMER_NS = 300_000  # how late a steady timer may fire
JUMP_NS = 100_000_000  # stamps this much further behind their receipts than lately: a new time line (a looped bag)


class Pacer:
    def __init__(self, pipeline: Pipeline, period_ns: int, slack_ns: int | None = None,
                 idle_ns: int = 100_000_000) -> None:
        self.pipeline, self.period_ns, self.idle_ns = pipeline, max(int(period_ns), 1), idle_ns
        self.drift_ns = self.period_ns // 1000  # a sensor clock 1000 ppm slower than the host's is followed
        self.slack_ns = 2 * self.period_ns + 2_000_000 if slack_ns is None else slack_ns
        # The least delay from a clock-stream stamp to its receipt seen lately (the transport's own,
        # without a late sample's extra): it rises by drift_ns a sample, falls at once, and follows
        # a jump of more than JUMP_NS (stamps on another time line).
        self.delay_ns: int | None = None
        self.backoff = self.period_ns
        self.work_ns = 1_000_000  # what processing the samples taken at a wake-up costs (moving average)

    @property
    def margin_ns(self) -> int:
        """How long before the expected arrival to take what has come: time to process it, and a
        timer's lateness, before the last sample arrives."""
        return min(2 * self.work_ns + TIMER_NS, self.pipeline.span_ns(self.pipeline.config.chunk))

    def worked(self, ns: int) -> None:
        """Processing what was taken at a wake-up took ``ns``."""
        self.work_ns += (ns - self.work_ns) // 8

    def seen(self, stamp_ns: int, steady_ns: int) -> None:
        """The clock stream's sample stamped ``stamp_ns`` (as pushed), received at ``steady_ns``."""
        delay, least = steady_ns - stamp_ns, self.delay_ns
        if least is None or delay - least > JUMP_NS:  # the first, or stamps on another time line: follow it
            self.delay_ns = delay
        else:
            self.delay_ns = min(least + self.drift_ns, delay)

    def expected_ns(self) -> int | None:
        """When (steady ns) the sample completing the next chunk should arrive; None: unknown."""
        due = self.pipeline.next_chunk_ns()
        if due is None or self.delay_ns is None:
            return None
        return due + self.delay_ns

    def wait_until(self, now_ns: int) -> int | None:
        """Until when (steady ns) to wait for input now that the completing sample is imminent or
        due; None: it is not (yet, or any more: overdue)."""
        expected = self.expected_ns()
        if expected is None or not expected - self.margin_ns <= now_ns < expected + self.slack_ns:
            return None
        return expected + self.slack_ns

    def next_wake(self, now_ns: int) -> int | None:
        """When (steady ns) to take the inputs next, on schedule; None when there is no schedule to
        keep (no prediction, or the sample is overdue): then wait for the clock stream (``backoff_ns``)."""
        expected = self.expected_ns()
        if expected is not None and now_ns < expected - self.margin_ns:
            self.backoff = self.period_ns
            return expected - self.margin_ns
        return None

    def defer_ns(self, now_ns: int, length_ns: int) -> int:
        """How long to put off other work of ``length_ns`` (the diagnostics report) that would
        otherwise run into the next chunk's take, or just after the last chunk's estimate (while it
        is published and received): until mid-way between two chunks. 0: now is fine, or there is
        no quiet time to aim for (no schedule, an overdue sample, chunks too close together)."""
        expected = self.expected_ns()
        if expected is None or now_ns >= expected:
            return 0
        span = self.pipeline.span_ns(self.pipeline.config.chunk)
        quiet_from, quiet_to = expected - span + span // 4, expected - self.margin_ns - length_ns
        if quiet_from >= quiet_to or quiet_from <= now_ns < quiet_to:
            return 0
        mid = expected - span // 2
        delay = mid - now_ns if now_ns < mid else mid + span - now_ns
        return delay if delay <= span else 0  # no chunk this close: nothing to keep clear of

    def backoff_ns(self) -> int:
        """How long to wait for the clock stream off schedule before the executor gets a turn: one
        clock-stream period, doubling while off schedule, up to ``idle_ns``."""
        wait = self.backoff
        self.backoff = min(2 * self.backoff, self.idle_ns)
        return wait
