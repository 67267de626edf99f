"""``ros2 run hiss_ros estimator``: live estimates from a trained checkpoint.

A thin adapter around ``hiss_ros.serving.StreamingEstimator``, which holds everything that is
not ROS (the trainer's pipeline, the model and its carried state, resets, de-normalisation).
The node turns messages into ``(stamp_ns, values)`` with the trainer's own extraction code,
publishes each estimate stamped with its chunk's last-sample time, hot-reloads ``model_path``
and reports on ``/diagnostics``. Everything it needs comes from the checkpoint.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from visualization_msgs.msg import MarkerArray

from hiss_ros.data.streams import StreamSpec, message_stamp_ns, value_reader
from hiss_ros.errors import HissError
from hiss_ros.models import STEP_BACKENDS
from hiss_ros.nodes.common import freeze_heap, message_class, running, spin
from hiss_ros.nodes.messages import TWIST, TWIST_COV, WRENCH, EstimateMessages
from hiss_ros.serving import StreamingEstimator, resolve_device

# name -> default; every one but model_path (hot reload) is fixed at start-up.
PARAMETERS: dict[str, Any] = {
    "model_path": "contact", "device": "auto", "num_threads": 0, "step_backend": "eager", "frame_id": "tool",
    "wrench_frame_id": "", "twist_frame_id": "", "world_frame_id": "world", "max_gap_s": 0.0,
    "velocity_covariance": False, "executor": "events", "output_prefix": "/hiss", "qos_depth": 100,
    "diagnostics_period_s": 1.0, "publish_markers": False,
}


SERVING_COUNTERS = ("estimates", "resets", "nonfinite_output")  # reported on their own, not as "pipeline ..."


class Estimator(Node):
    def __init__(self) -> None:
        super().__init__("hiss_estimator")
        for name, default in PARAMETERS.items():  # a descriptor each: rclpy fills in name and type
            self.declare_parameter(name, default, ParameterDescriptor(read_only=name != "model_path"))
        self.p = {name: self.get_parameter(name).value for name in PARAMETERS}
        if self.p["num_threads"] > 0:
            torch.set_num_threads(self.p["num_threads"])
        if self.p["step_backend"] not in STEP_BACKENDS:
            raise HissError(f"step_backend:={self.p['step_backend']}: expected one of {', '.join(STEP_BACKENDS)}")
        self.device = resolve_device(self.p["device"])
        # Start-up work before any subscription or publisher exists: a sensor publisher that matched
        # us would otherwise send into a queue nobody reads yet, and lose what overflows it.
        self.est = self._load(self.p["model_path"])
        self._compile_lock, self.compile_status = threading.Lock(), "off"
        if self.p["step_backend"] == "compile":  # ~20 s on 2 cores, seconds once cached
            self.get_logger().info("compiling the streaming step (step_backend:=compile)")
            self.compile_status = self._compile(self.est)
        freeze_heap()  # no 100 ms garbage collection in the middle of the stream
        self.inputs = self.est.spec.inputs
        self.reloads, self.latencies = 0, deque(maxlen=1000)
        self.received, self.unreadable = [0] * len(self.inputs), [0] * len(self.inputs)
        self._rate_mark = (time.monotonic(), 0, [0] * len(self.inputs))  # for rates between reports
        sensor = qos_profile_sensor_data
        qos = QoSProfile(depth=self.p["qos_depth"], reliability=sensor.reliability, durability=sensor.durability,
                         history=sensor.history)
        self._readers: list[Any] = [None] * len(self.inputs)
        self.subscriptions_ = [self.create_subscription(message_class(s.type), s.topic,
                                                        lambda m, i=i: self._on_sample(i, m), qos)
                               for i, s in enumerate(self.inputs)]
        self._estimate_publishers: dict[tuple[str, str], Any] = {}
        self.messages = self._messages(self.est)
        self.diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.markers = (self.create_publisher(MarkerArray, f"{self.p['output_prefix'].rstrip('/')}/markers", 10)
                        if self.p["publish_markers"] else None)
        self.create_timer(self.p["diagnostics_period_s"], self._report)
        self.add_on_set_parameters_callback(self._on_parameters)
        self.get_logger().info(
            f"estimating {[s.topic for s in self.est.spec.outputs]} from {[s.topic for s in self.inputs]} on "
            f"{self.device}, chunk {self.est.pipeline.config.chunk} at {self.est.pipeline.config.input_rate_hz} Hz")

    # --- models -------------------------------------------------------------------------------

    def _load(self, path: str) -> StreamingEstimator:
        """Read, check and warm up a checkpoint; nothing of the running node changes."""
        return StreamingEstimator.from_checkpoint(path, self.device, self.p["max_gap_s"] or None)

    def _messages(self, est: StreamingEstimator) -> EstimateMessages:
        return EstimateMessages(est.spec, self.p["velocity_covariance"], self._frame_id, self._publisher)

    def _publisher(self, stream: StreamSpec, msg_type: str) -> Any:
        key = (stream.topic, msg_type)  # kept across hot reloads (the streams cannot change)
        if key not in self._estimate_publishers:
            topic = f"{self.p['output_prefix'].rstrip('/')}{stream.topic}"
            self._estimate_publishers[key] = self.create_publisher(message_class(msg_type), topic, 10)
        return self._estimate_publishers[key]

    def _frame_id(self, stream: StreamSpec, msg_type: str) -> str:
        """A world-frame velocity is in the world frame; the rest in the tool (or their kind's) frame."""
        if stream.derive == "world_velocity":
            return self.p["world_frame_id"]
        own = {WRENCH: "wrench_frame_id", TWIST: "twist_frame_id", TWIST_COV: "twist_frame_id"}.get(msg_type)
        return (own and self.p[own]) or self.p["frame_id"]

    def _on_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Hot reload: a new model_path is loaded, checked and warmed up, then swapped in; one that
        fails, or expects other streams, is refused and the old model keeps running."""
        for p in (p for p in params if p.name == "model_path"):
            try:
                new = self._load(p.value)
                if not new.spec.same_streams(self.est.spec):
                    raise HissError(f"{p.value} expects {new.spec.describe()}; the running model has "
                                    f"{self.est.spec.describe()} (restart the node to change streams)")
                messages = self._messages(new)
            except Exception as exc:
                return SetParametersResult(successful=False, reason=f"model_path refused: {exc}")
            new.counters.update(self.est.counters)
            self.est, self.messages = new, messages
            gc.unfreeze()  # the old model may sit in reference cycles: let the collector free it
            freeze_heap()
            if self.p["step_backend"] == "compile":
                self._compile_in_background(new)
            self.reloads += 1
            self.get_logger().info(f"model swapped in: {p.value}")
        return SetParametersResult(successful=True)

    def _compile(self, est: StreamingEstimator) -> str:
        """Compile the model's step and switch it over; the status for /diagnostics. A model the
        compiled step does not cover, or a failed compile (no C++ compiler...), keeps the eager step."""
        try:
            seconds = est.compile()
        except Exception as exc:
            status = f"failed ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]})"
            self.get_logger().error(f"step_backend:=compile {status}; the eager step stays")
            return status
        self.get_logger().info(f"compiled step in use ({seconds:.1f} s to compile)")
        return "in use"

    def _compile_in_background(self, est: StreamingEstimator) -> None:
        """After a hot reload the new model estimates eagerly while a thread compiles it (the
        compiler holds the GIL for up to ~0.5 s at a time: estimates are late meanwhile)."""
        with self._compile_lock:
            self.compile_status = "compiling"

        def work() -> None:
            status = self._compile(est)
            with self._compile_lock:
                if est is self.est:  # not swapped out by another reload meanwhile
                    self.compile_status = status
            gc.unfreeze()  # what the compiler left, and a model swapped out meanwhile, go now, once
            freeze_heap()

        threading.Thread(target=work, name="hiss_compile", daemon=True).start()

    # --- data path ----------------------------------------------------------------------------

    def _on_sample(self, i: int, msg: Any) -> None:
        try:
            if self._readers[i] is None:
                self._readers[i] = value_reader(self.inputs[i], msg)
            values = self._readers[i](msg)
        except (AttributeError, TypeError, ValueError) as exc:  # a message the checkpoint's fields do not fit
            self.unreadable[i] += 1
            self.get_logger().warn(f"{self.inputs[i].topic}: cannot read {list(self.inputs[i].fields)} ({exc}); "
                                   "sample dropped", throttle_duration_sec=5.0)
            return
        spec = self.inputs[i]
        stamp = message_stamp_ns(spec, msg, 0) if spec.has_header else self.get_clock().now().nanoseconds
        self.received[i] += 1
        est = self.est
        for chunk in est.pipeline.push(i, stamp, values):
            t0 = time.perf_counter()
            estimate = est.estimate(chunk)
            if estimate is not None:
                stamp_msg = self.messages.publish(estimate.values, estimate.stamp_ns)
                if self.markers is not None:
                    self.markers.publish(self.messages.arrows(estimate.values, stamp_msg))
            self.latencies.append(time.perf_counter() - t0)

    # --- diagnostics ----------------------------------------------------------------------------

    def _report(self) -> None:
        for i, spec in enumerate(self.inputs):
            if self.received[i] == 0:
                self.get_logger().warn(f"waiting for data on {spec.topic}", throttle_duration_sec=5.0)
        lat = np.asarray(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        step = np.asarray(self.est.step_seconds) * 1e3 if self.est.step_seconds else np.zeros(1)
        counters = self.est.counters
        t_then, est_then, recv_then = self._rate_mark
        now = time.monotonic()
        span = max(now - t_then, 1e-9)
        self._rate_mark = (now, counters["estimates"], list(self.received))
        topics = [s.topic for s in self.inputs]
        per_input = zip(topics, self.subscriptions_, self.received, recv_then, self.unreadable, strict=True)
        values = {
            "estimates": counters["estimates"], "estimate_rate_hz": f"{(counters['estimates'] - est_then) / span:.1f}",
            "resets": counters["resets"], "nonfinite_outputs": counters["nonfinite_output"], "device": self.device,
            "step_backend": self.est.model.step_backend, "compile": self.compile_status,
            "model_path": self.est.path, "reloads": self.reloads,
            "inference_ms_p50": f"{np.percentile(lat, 50):.3f}", "inference_ms_p99": f"{np.percentile(lat, 99):.3f}",
            "step_ms_p50": f"{np.percentile(step, 50):.3f}",
            **{key: value for t, sub, n, m, bad in per_input for key, value in (
                (f"publishers {t}", sub.get_publisher_count()), (f"received {t}", n),
                (f"rate_hz {t}", f"{(n - m) / span:.1f}"), (f"unreadable {t}", bad))},
            **{f"pipeline {k}": v for k, v in counters.items() if k not in SERVING_COUNTERS},
        }
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name="hiss_ros estimator", hardware_id="hiss_ros",
                                  message=f"{counters['estimates']} estimates")
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag.publish(msg)


def main(args: list[str] | None = None, node_class: type[Estimator] = Estimator) -> int:
    rclpy.init(args=args)
    try:
        node = node_class()
    except HissError as exc:
        print(f"hiss_estimator: error: {exc}")
        rclpy.try_shutdown()
        return 2
    executor = node.get_parameter("executor").value
    if executor not in ("events", "single_threaded"):
        node.get_logger().error(f"executor:={executor!r}: expected events or single_threaded")
        node.destroy_node()
        rclpy.try_shutdown()
        return 2
    with running(node):
        spin(node, executor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
