"""The estimator's ``/diagnostics``: one status, named ``<node>: estimator`` as diagnostic_updater
names its tasks, with a level a robot's monitoring can act on:

- ERROR: no model (configure failed) or the model gave non-finite outputs since the last report;
- WARN: not configured or not active (lifecycle), waiting for data, an input silent for longer
  than ``sensor_timeout_s``, a model with a variance head predicting over 3x its validation error
  (out of its depth: unseen input, a sensor fault), or an input whose samples come at a rate more
  than 20 % off the rate measured in its training bags (timed by the samples' own stamps over at
  least 2 s: a 30 Hz IMU where the model learnt 50 Hz);
- OK otherwise.
Values: counters of the serving core and the pipeline, per-input receipts and measured rates,
the time per estimate and the model step's share of it, device, backend, model.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType

from hiss_ros.pipeline.novelty import Novelty
from hiss_ros.serving import Estimate, ServingSpec

SERVING_COUNTERS = ("estimates", "resets", "nonfinite_output")  # reported on their own, not as "pipeline ..."
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
OOD_STD_RATIO = 3.0  # predicted std this many times the validation RMSE, over the last 20 estimates: WARN
RATE_TOLERANCE, RATE_WINDOW_NS = 0.2, 2_000_000_000  # live sample rate vs the trained one, measured over >= 2 s


def _ms(seconds: Any, *q: float) -> list[str]:
    """Percentiles ``q`` of ``seconds`` in ms, nearest rank (one sort of the last 1,000: a tenth of
    what a numpy percentile call costs on them)."""
    s = sorted(seconds)
    return [f"{s[min(int(p / 100 * len(s)), len(s) - 1)] * 1e3:.3f}" if s else "0.000" for p in q]


class Diagnostics:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.name = f"{node.get_fully_qualified_name().lstrip('/')}: estimator"
        self.failure = ""  # why the node has no model, when it has none
        self.latencies: deque[float] = deque(maxlen=1000)  # per estimate: estimate and publish, wall time
        self.glue_cpu: deque[float] = deque(maxlen=1000)  # the same beyond the model step, thread CPU time
        self.track(None)
        self.publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        node.create_timer(node.p["diagnostics_period_s"], self._on_timer)
        # A report due just before a chunk's take, or just after its estimate, is put off until
        # mid-way to the next (``Pacer.defer_ns``): the timers of both run on the one executor, at
        # periods that are multiples of each other, so a report that collides once would every time.
        self._later = node.create_timer(1.0, self._on_later, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._later.cancel()
        self.report_ns = 2_000_000  # what a report costs: the longest lately (decaying)

    def track(self, spec: ServingSpec | None, max_gap_s: float | None = None) -> None:
        """Start counting the inputs of ``spec`` (None: no model); ``max_gap_s``: the node's gap
        limit when it overrides the trained one."""
        n = len(spec.inputs) if spec else 0
        self.received, self.unreadable, self.last_receipt = [0] * n, [0] * n, [0] * n
        self.lost = [0] * n  # the middleware's message-lost events; -1: not supported by this rmw
        self.retarget(spec)
        self._mark = (time.monotonic(), 0, [0] * n, 0)  # time, estimates, received, non-finite outputs
        # Per input: [first stamp, last stamp, samples] of the samples in stamp order since the last
        # rate verdict, and that verdict (Hz, None before the first).
        self.window: list[list[int]] = [[0, 0, 0] for _ in range(n)]
        self.rates: list[float | None] = [None] * n
        self._gap_ns = int((max_gap_s or (spec.pipeline.max_gap_s if spec else 0)) * 1e9)

    def retarget(self, spec: ServingSpec | None) -> None:
        """Judge the estimates of the model of ``spec`` (a hot reload, same inputs): its trained
        rates, validation error and novelty statistics; what was recorded of the last model goes."""
        self.spec = spec
        # Predicted std over the validation RMSE, averaged over channels, per estimate (variance head):
        # about 1 on data like the validation data, far above it out of the model's depth.
        self.std_ratio: deque[float] = deque(maxlen=200)
        self.novelty: deque[float] = deque(maxlen=200)  # per estimate (hiss_ros.pipeline.novelty), 1: typical
        self._unscored: deque[np.ndarray] = deque(maxlen=200)  # input chunks whose novelty ``report`` scores
        self._scorer: Novelty | None = None  # ... with the statistics of the model that estimated from them
        self._novelty_warn = spec.novelty.warn if spec and spec.novelty else None
        mse = spec.validation_mse if spec else None
        self._typical_var = np.asarray(mse) if mse else None
        self.expected = spec.expected_rates_hz() if spec else []

    def sample(self, i: int, stamp: int) -> None:
        """Count input ``i``'s sample stamped ``stamp`` toward its live rate: the data's own rate,
        as training measured it, whatever the delivery (bursts, a replay at another speed)."""
        w = self.window[i]
        if stamp > w[1]:
            if w[2] == 0 or stamp - w[1] > self._gap_ns:  # the first, or after a gap: a new window
                w[0], w[2] = stamp, 0
            w[1] = stamp
            w[2] += 1
            if w[1] - w[0] >= RATE_WINDOW_NS:
                self.rates[i] = (w[2] - 1) * 1e9 / (w[1] - w[0])
                w[2] = 0
        elif stamp < w[1] - self._gap_ns:  # time went back (a looped bag): start again
            w[0] = w[1] = stamp
            w[2] = 1

    def observe(self, estimate: Estimate, x: np.ndarray | None = None, novelty: Novelty | None = None) -> None:
        """Record one estimate's novelty and predicted variance (physical units), where it has them;
        an estimate without its novelty score has it scored at the next report, in one batch, from
        its input chunk ``x`` and the model's statistics ``novelty``."""
        if estimate.novelty is not None:
            self.novelty.append(estimate.novelty)
        elif x is not None and novelty is not None:
            if novelty is not self._scorer:  # another model (a hot reload): score the last one's first
                self._score()
                self._scorer = novelty
            self._unscored.append(x)
        if estimate.variance is not None and self._typical_var is not None:
            self.std_ratio.append(float(np.sqrt(estimate.variance / self._typical_var).mean()))

    def _on_timer(self) -> None:
        intake = self.node.intake
        delay = intake.defer_ns(time.monotonic_ns(), self.report_ns) if intake is not None else 0
        if delay > 0:
            self._later.timer_period_ns = delay
            self._later.reset()
        else:
            self.report()

    def _on_later(self) -> None:
        self._later.cancel()
        self.report()

    def report(self) -> None:
        began = time.monotonic_ns()
        self._report()
        self.report_ns = max(time.monotonic_ns() - began, self.report_ns * 7 // 8)

    def _report(self) -> None:
        node = self.node
        node.flush()  # the samples it holds back count as received
        node.priority.check()  # a node that cannot keep up gives SCHED_FIFO back
        self._score()
        est = node.est
        if est is not None:
            level, message = self._assess()
        else:  # a failed configure is an error; not configured yet is waiting for a lifecycle manager
            level, message = (ERROR, f"no model: {self.failure}") if self.failure else (WARN, "unconfigured")
        values: dict[str, Any] = {}
        if est is not None:
            counters = est.counters
            now = time.monotonic()
            t_then, est_then, recv_then, _ = self._mark
            span = max(now - t_then, 1e-9)
            self._mark = (now, counters["estimates"], list(self.received), counters["nonfinite_output"])
            topics = [s.relative_topic for s in self.spec.inputs]
            values = {
                "estimates": counters["estimates"],
                "estimate_rate_hz": f"{(counters['estimates'] - est_then) / span:.1f}",
                "resets": counters["resets"], "nonfinite_outputs": counters["nonfinite_output"],
                "device": node.device, "step_backend": est.runner.backend, "compile": node.compile_status,
                "model_path": est.path, "reloads": node.reloads, "scheduling": node.priority.status,
                **dict(zip(("inference_ms_p50", "inference_ms_p99"), _ms(self.latencies, 50, 99), strict=True)),
                "step_ms_p50": _ms(est.step_seconds, 50)[0], "glue_cpu_ms_p50": _ms(self.glue_cpu, 50)[0],
                "samples_batched": node.intake.batched if node.intake is not None else 0,
                "intake": node.intake.mode if node.intake is not None else node.p["intake"],
                **({"predicted_std_over_validation_rmse_median": f"{np.median(self.std_ratio):.2f}"}
                   if self.std_ratio else {}),
                **({"input_novelty_median": f"{np.median(self.novelty):.2f}"} if self.novelty else {}),
                **({"input_novelty_warn_level": f"{self._novelty_warn:.2f}"} if self._novelty_warn else {}),
                **{key: value for t, pubs, n, m, bad, lost, r in zip(
                    topics, node.intake.publishers() if node.intake else [0] * len(topics), self.received, recv_then,
                    self.unreadable, self.lost, self.rates, strict=True)
                   for key, value in ((f"publishers {t}", pubs),
                                      (f"received {t}", n), (f"rate_hz {t}", f"{(n - m) / span:.1f}"),
                                      (f"sample_rate_hz {t}", "n/a" if r is None else f"{r:.1f}"),
                                      (f"unreadable {t}", bad), (f"lost {t}", lost if lost >= 0 else "n/a"))},
                **{f"decoded_by {t}": d.backend for t, d in zip(topics, node.decoders, strict=False)},
                **{f"pipeline {k}": v for k, v in counters.items() if k not in SERVING_COUNTERS},
            }
        status = DiagnosticStatus(level=level, name=self.name, message=message,
                                  hardware_id=f"hiss_ros {est.path if est else node.p['model_path']}")
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = node.get_clock().now().to_msg()
        self.publisher.publish(msg)

    def _score(self) -> None:
        if self._unscored:
            self.novelty.extend(self._scorer.score(np.stack(self._unscored)).tolist())
            self._unscored.clear()

    def _assess(self) -> tuple[bytes, str]:
        """(level, message) of a node with a model (before ``report`` moves the rate mark on)."""
        node, est = self.node, self.node.est
        if est.counters["nonfinite_output"] > self._mark[3]:
            return ERROR, "the model gave non-finite outputs (not published; state reset)"
        if node.intake is None:
            return WARN, "inactive: configured, not subscribed (lifecycle)"
        now, timeout_ns = time.monotonic_ns(), node.p["sensor_timeout_s"] * 1e9
        for i, s in enumerate(self.spec.inputs):
            topic = node.resolve_topic_name(s.relative_topic)
            if self.received[i] == 0:
                if node.throttle.due(("waiting", i), 5.0):
                    node.get_logger().warn(f"waiting for data on {topic}")
                return WARN, f"waiting for data on {topic}"
            if now - self.last_receipt[i] > timeout_ns:
                return WARN, f"no data on {topic} for {(now - self.last_receipt[i]) / 1e9:.1f} s (stale)"
        for i, (s, live, expected) in enumerate(zip(self.spec.inputs, self.rates, self.expected, strict=True)):
            if live is not None and expected and abs(live / expected - 1) > RATE_TOLERANCE:
                message = f"{s.relative_topic} at {live:.4g} Hz, trained at {expected:.4g} Hz"
                if node.throttle.due(("rate", i), 10.0):
                    node.get_logger().warn(f"{message}: the model was trained on another time scale")
                return WARN, message
        recent = np.median(list(self.std_ratio)[-20:]) if len(self.std_ratio) >= 20 else 0.0
        if recent > OOD_STD_RATIO:
            return WARN, (f"predicted uncertainty {recent:.1f}x the validation error: "
                          "input unlike the training data (unseen contact, sensor fault?)")
        novel = np.median(list(self.novelty)[-20:]) if len(self.novelty) >= 20 else 0.0
        if self._novelty_warn is not None and novel > self._novelty_warn:
            return WARN, (f"input novelty {novel:.1f} (typical training input 1, 99.9 % of it below "
                          f"{self._novelty_warn:.1f}): input unlike the training data (sensor fault, unseen motion?)")
        return OK, f"{est.counters['estimates']} estimates"

