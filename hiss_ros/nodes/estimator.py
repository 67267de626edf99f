"""``ros2 run hiss_ros estimator``: live estimates from a trained checkpoint, a managed lifecycle node.

A thin adapter around ``hiss_ros.serving.StreamingEstimator`` (everything that is not ROS: the trainer's pipeline,
the model and its carried state, resets, de-normalisation). configure loads, checks and warms up the model
(step_backend auto, the default: eager until a thread has compiled the step or loaded it from the cache; compile:
compiled first; eager: never; graph: on CUDA, captured in a CUDA graph); activate subscribes, publishes and runs
the threads SCHED_FIFO where permitted (``realtime_priority``); deactivate, cleanup and destroy undo them.
``autostart`` (default) configures and activates at start, so plain ``ros2 run`` estimates at once.

Topics are relative: the inputs are the checkpoint's topics without their leading slash (``imu/data``,
``tactile``: remap them), the estimates are private (``~/wrench``, ``~/twist``, ``~/markers``), so a
namespace moves all of them. ``~/reset`` (std_srvs/Trigger) forgets the stream.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import rclpy
import torch
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from hiss_ros.data.streams import header_stamp_ns, value_reader
from hiss_ros.errors import HissError
from hiss_ros.models import STEP_BACKENDS
from hiss_ros.nodes.common import Throttle, freeze_heap, input_class, message_class, running, spin
from hiss_ros.nodes.diagnostics import Diagnostics
from hiss_ros.nodes.intake import INTAKES, CallbackIntake, PacedIntake, make_intake
from hiss_ros.nodes.messages import EstimateMessages, frames
from hiss_ros.nodes.realtime import Priority
from hiss_ros.nodes.reload import ModelSwap
from hiss_ros.nodes.stamping import Stamps
from hiss_ros.nodes.wire import Decoder
from hiss_ros.serving import StreamingEstimator, resolve_device

# name -> default; every one but model_path (hot reload) is fixed at start-up.
PARAMETERS: dict[str, Any] = {
    "model_path": "contact", "device": "auto", "num_threads": 0, "step_backend": "auto", "frame_id": "tool",
    "wrench_frame_id": "", "twist_frame_id": "", "world_frame_id": "world", "max_gap_s": 0.0,
    "velocity_covariance": False, "executor": "events", "qos_depth": 100, "diagnostics_period_s": 1.0,
    "publish_markers": False, "autostart": True, "sensor_timeout_s": 1.0, "intake": "paced", "realtime_priority": 10,
}
OK, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class Estimator(ModelSwap, LifecycleNode):
    def __init__(self) -> None:
        super().__init__("hiss_estimator")
        for name, default in PARAMETERS.items():  # a descriptor each: rclpy fills in name and type
            self.declare_parameter(name, default, ParameterDescriptor(read_only=name != "model_path"))
        self.p = {name: self.get_parameter(name).value for name in PARAMETERS}
        if self.p["num_threads"] > 0:
            torch.set_num_threads(self.p["num_threads"])
        for name, choices in (("step_backend", ("auto", *STEP_BACKENDS)), ("executor", ("events", "single_threaded")),
                              ("intake", INTAKES)):
            if self.p[name] not in choices:
                raise HissError(f"{name}:={self.p[name]!r}: expected one of {', '.join(choices)}")
        self.device = resolve_device(self.p["device"])
        self.priority = Priority(self.p["realtime_priority"], self.get_logger().info, self.get_logger().warn)
        self.est, self.messages, self.markers = None, None, None  # StreamingEstimator, EstimateMessages, publisher
        self.decoders: list[Decoder] = []  # per input while active: rosbags' or rclpy's (/diagnostics says)
        self.intake: PacedIntake | CallbackIntake | None = None  # the inputs, while active
        self._outputs: dict[tuple[str, str], Any] = {}  # (topic, type) -> lifecycle publisher, across reloads
        self._compile_lock, self.compile_status, self.reloads = threading.Lock(), "off", 0
        self.throttle = Throttle()  # its repeated warnings (unreadable samples, stale inputs), per input
        self.diagnostics = Diagnostics(self)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.add_on_set_parameters_callback(self._on_parameters)
        if self.p["autostart"]:  # a model that cannot serve ends a plain `ros2 run` with its reason
            if self.trigger_configure() != OK:
                raise HissError(self.diagnostics.failure)
            self.trigger_activate()

    # --- lifecycle ----------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load, check and warm up the model before anything subscribes: a publisher that matched
        us meanwhile would send into a queue nobody reads, and lose what overflows it."""
        try:
            est = self._load(self.p["model_path"])
            self._classes = [input_class(s) for s in est.spec.inputs]
            self.messages = self._messages(est)
        except HissError as exc:
            self.diagnostics.failure = str(exc)
            self.get_logger().error(f"configure failed: {exc}")
            return FAILURE
        self.est, self.diagnostics.failure = est, ""
        if self.p["step_backend"] == "compile":  # ~20 s on 2 cores the first time, then from the cache
            self.compile_status = self._compile(est)
        elif self.p["step_backend"] == "auto":  # eager at once, compiled once a thread has it
            self._compile_in_background(est)
        self.markers = self.p["publish_markers"] and self.create_lifecycle_publisher(MarkerArray, "~/markers", 10)
        self._inputs = est.spec.inputs
        self.diagnostics.track(est.spec, est.pipeline.config.max_gap_s)
        self.get_logger().info(
            f"estimating {self.messages.topics} from {[s.relative_topic for s in self._inputs]} on {self.device}, "
            f"chunk {est.pipeline.config.chunk} at {est.pipeline.config.input_rate_hz} Hz")
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        qos = QoSProfile(depth=self.p["qos_depth"], reliability=qos_profile_sensor_data.reliability,
                         durability=qos_profile_sensor_data.durability, history=qos_profile_sensor_data.history)
        self._readers: list[Any] = [None] * len(self._inputs)
        warn = self.get_logger().warn
        self.decoders = [Decoder(s, c, warn) for s, c in zip(self._inputs, self._classes, strict=True)]
        self._stamps = Stamps(self._inputs, self.est.spec.input_stamps, int(self.est.pipeline.config.max_gap_s * 1e9),
                              lambda: self.get_clock().now().nanoseconds, warn)
        rate = self.est.spec.expected_rates_hz()[0] or self.est.pipeline.config.input_rate_hz
        self.intake = make_intake(self.p["intake"], self, [s.relative_topic for s in self._inputs], self._classes, qos,
                                  self.diagnostics.lost, self._process, self.est.pipeline, rate, self._stamp_of)
        freeze_heap()  # no 100 ms garbage collection in the middle of the stream
        self.priority.enter()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.priority.leave()  # first: whatever fails below, the threads' scheduling is back
        self.intake.close()  # what has come is processed first
        self.intake, self.decoders = None, []
        self.est.restart("deactivated")
        return super().on_deactivate(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.intake is not None:  # from active: no estimate after it
            self.on_deactivate(state)
        if self.est is not None:
            self.on_cleanup(state)
        return super().on_shutdown(state)

    def destroy_node(self) -> None:  # active (a node in a larger program): undo what activate did
        self.priority.leave()
        if self.intake is not None:  # the paced intake's subscriptions are its own; after a shutdown it cannot publish
            self.intake.close(process_pending=self.context.ok())
        super().destroy_node()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        for pub in [*self._outputs.values(), *([self.markers] if self.markers else [])]:
            self.destroy_lifecycle_publisher(pub)
        self._outputs, self.est, self.messages, self.markers = {}, None, None, None
        self.diagnostics.track(None)
        gc.unfreeze()
        return super().on_cleanup(state)

    # --- models -------------------------------------------------------------------------------

    def _load(self, path: str) -> StreamingEstimator:
        """Read, check and warm up a checkpoint; nothing of the running node changes."""
        est = StreamingEstimator.from_checkpoint(path, self.device, self.p["max_gap_s"] or None)
        est.score_novelty = False  # the diagnostics score it in batches (unless the variance needs it)
        if self.p["step_backend"] == "graph":  # captured now (milliseconds), not at the first estimate
            try:
                est.runner.set_backend("graph")
            except ValueError as exc:
                raise HissError(f"step_backend:=graph: {exc}") from None
            est.warm_up()
        return est

    def _messages(self, est: StreamingEstimator) -> EstimateMessages:
        return EstimateMessages(est.spec, self.p["velocity_covariance"], frames(self.p), self._publisher,
                                per_estimate=est.predicts_variance)

    def _publisher(self, topic: str, msg_type: str) -> Any:
        if (known := [t for top, t in self._outputs if top == topic and t != msg_type]):
            raise HissError(f"{topic} would change type from {known[0]} to {msg_type}: restart the node to change it")
        if (topic, msg_type) not in self._outputs:
            pub = self.create_lifecycle_publisher(message_class(msg_type), topic, 10)
            if self.intake is not None:  # active already (a hot reload with a new output type): enable it now
                pub.on_activate(None)
            self._outputs[topic, msg_type] = pub
        return self._outputs[topic, msg_type]

    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.est is None:
            response.success, response.message = False, "not configured: no model to reset"
        else:
            self.flush()
            self.est.restart("reset_service")
            response.success, response.message = True, "stream forgotten: the next estimate starts from a fresh state"
        return response

    # --- data path ----------------------------------------------------------------------------

    def _stamp_of(self, i: int, data: bytes) -> int | None:
        """Where input ``i``'s sample may wait (intake:=callbacks): the clock's header stamp, 0 for the others."""
        stamps = self._stamps.header
        return (self.decoders[0].stamp_ns(data) if i == 0 else 0) if stamps[0] and stamps[i] is not None else None

    def flush(self) -> None:
        """Process the samples received but not yet processed (before anything reads or resets the stream's state)."""
        if self.intake is not None:
            self.intake.flush()

    def _process(self, i: int, data: bytes, steady: int) -> int | None:
        """Input ``i``'s sample, received at ``steady``, into the model; its stamp (None: unreadable or dropped)."""
        spec, diag = self._inputs[i], self.diagnostics
        # Straight from the bytes where the type allows (wire.Layout), once the stamp source is known.
        read = self.decoders[i].read(data) if self._stamps.header[i] is not None else None
        if read is not None:
            (values, header_ns), msg = read, None
        else:
            try:
                msg = self.decoders[i](data)
                if self._readers[i] is None:
                    self._readers[i] = value_reader(spec, msg)
                values, header_ns = self._readers[i](msg), header_stamp_ns(msg)
            except (AttributeError, TypeError, ValueError, LookupError) as exc:  # a message the fields do not fit
                diag.unreadable[i] += 1
                if self.throttle.due(("unreadable", i), 5.0):
                    self.get_logger().warn(f"{spec.relative_topic}: cannot read {list(spec.fields)} ({exc}); "
                                           "sample dropped")
                return None
        diag.received[i] += 1
        diag.last_receipt[i] = steady
        stamp, est = self._stamps(i, header_ns, steady, msg), self.est
        taken = (counters := est.pipeline.counters)["accepted"]
        chunks = est.pipeline.push(i, stamp, values)
        if counters["accepted"] == taken:  # dropped (counted): its stamp informs no timing
            return None
        diag.sample(i, stamp)
        if i == 0:
            self._stamps.anchor(stamp, steady)
        for chunk in chunks:
            t0, cpu = time.perf_counter(), time.thread_time_ns()
            estimate = est.estimate(chunk)
            if estimate is not None:
                self.messages.publish(estimate.values, estimate.stamp_ns, estimate.variance)
                self.diagnostics.observe(estimate, chunk.x, est.spec.novelty)
                if self.markers:
                    self.markers.publish(self.messages.arrows(estimate.values, estimate.stamp_ns))
            diag.latencies.append(time.perf_counter() - t0)
            diag.glue_cpu.append((time.thread_time_ns() - cpu - est.step_cpu_ns) * 1e-9)
        return stamp


def main(args: list[str] | None = None, node_class: type[Estimator] = Estimator) -> int:
    rclpy.init(args=args)
    try:
        node = node_class()
    except HissError as exc:
        print(f"hiss_estimator: error: {exc}")
        rclpy.try_shutdown()
        return 2
    with running(node):
        spin(node, node.p["executor"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
