"""``ros2 run hiss_ros estimator``: live estimates from a trained checkpoint.

The node is a thin adapter. Everything it needs comes from the checkpoint: the input streams
(topic, type, fields), rates, chunk, filter, normalisation and the output streams. Callbacks
only turn a message into ``(stamp_ns, values)`` with the trainer's own extraction code and
push it into the trainer's own ``Pipeline``; each completed chunk advances the model one
``step_chunk`` with the state carried, and the estimate is published stamped with the chunk's
last-sample time. A break in the input (gap, time going back) resets the model state.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from visualization_msgs.msg import Marker, MarkerArray

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.data.streams import StreamSpec, message_stamp_ns, value_reader
from hiss_ros.errors import HissError
from hiss_ros.models import STEP_BACKENDS, config_to_dict
from hiss_ros.nodes.common import freeze_heap, message_class, running, shipped_model, spin
from hiss_ros.pipeline import Normalization, Pipeline
from hiss_ros.train.config import TrainConfig

# What an estimate of each ground-truth type is published as, and where its channels go.
ESTIMATE_FIELDS = {"world_velocity": "twist.linear", "body_velocity": "twist.linear"}
TWIST, TWIST_COV, WRENCH = ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/TwistWithCovarianceStamped",
                            "geometry_msgs/msg/WrenchStamped")
# Row of a TwistWithCovariance covariance (6 x 6, row-major: vx vy vz wx wy wz) per channel.
_COV_ROW = {f"{part}.{a}": 3 * j + i for j, part in enumerate(("linear", "angular")) for i, a in enumerate("xyz")}
FIXED = ParameterDescriptor(read_only=True)
UNKNOWN_VARIANCE = 1.0e6  # a twist component the model does not estimate (robot_localization's convention)


@dataclass
class _Loaded:
    """A validated checkpoint, ready to swap in."""

    path: str
    cfg: TrainConfig
    model: Any
    pipeline: Pipeline
    out_mean: np.ndarray
    out_std: np.ndarray
    out_variance: np.ndarray | None  # per output channel, physical units: the validation MSE


class Estimator(Node):
    def __init__(self) -> None:
        super().__init__("hiss_estimator")
        # Only model_path changes at run time (hot reload); the rest is set at start-up.
        self.declare_parameter("model_path", "contact")
        self.declare_parameter("device", "auto", FIXED)
        self.declare_parameter("num_threads", 0, FIXED)
        self.declare_parameter("step_backend", "eager", FIXED)
        self.declare_parameter("frame_id", "tool", FIXED)
        self.declare_parameter("wrench_frame_id", "", FIXED)
        self.declare_parameter("twist_frame_id", "", FIXED)
        self.declare_parameter("world_frame_id", "world", FIXED)
        self.declare_parameter("max_gap_s", 0.0, FIXED)
        self.declare_parameter("velocity_covariance", False, FIXED)
        self.declare_parameter("executor", "events", FIXED)
        self.declare_parameter("output_prefix", "/hiss", FIXED)
        self.declare_parameter("qos_depth", 100, FIXED)
        self.declare_parameter("diagnostics_period_s", 1.0, FIXED)
        self.declare_parameter("publish_markers", False, FIXED)
        threads = self.get_parameter("num_threads").value
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = self._device(self.get_parameter("device").value)
        self.step_backend = self.get_parameter("step_backend").value
        if self.step_backend not in STEP_BACKENDS:
            raise HissError(f"step_backend:={self.step_backend}: expected one of {', '.join(STEP_BACKENDS)}")
        self.max_gap_s = self.get_parameter("max_gap_s").value
        self.velocity_covariance = self.get_parameter("velocity_covariance").value
        self._install(self._load(self.get_parameter("model_path").value))
        # Start-up work before any subscription or publisher exists: a sensor publisher that matched
        # us would otherwise send into a queue nobody reads yet, and lose what overflows it.
        self._warmup(self.model)
        self._compile_lock = threading.Lock()
        self.compile_status = "off"
        if self.step_backend == "compile":  # ~20 s on 2 cores, seconds once cached
            self.get_logger().info("compiling the streaming step (step_backend:=compile)")
            self.compile_status = self._compile(self.model)
        freeze_heap()  # no 100 ms garbage collection in the middle of the stream
        self.reloads = 0
        self.latencies: deque[float] = deque(maxlen=1000)
        self.estimates = 0
        self.resets = 0
        self.received = [0] * len(self.inputs)
        self.rejected = [0] * len(self.inputs)
        self._rate_mark = (time.monotonic(), 0, [0] * len(self.inputs))  # for rates between reports
        depth = self.get_parameter("qos_depth").value
        qos = QoSProfile(depth=depth, reliability=qos_profile_sensor_data.reliability,
                         durability=qos_profile_sensor_data.durability, history=qos_profile_sensor_data.history)
        self._readers: list[Any] = [None] * len(self.inputs)
        self.subscriptions_ = [
            self.create_subscription(message_class(spec.type), spec.topic, lambda m, i=i: self._on_sample(i, m), qos)
            for i, spec in enumerate(self.inputs)
        ]
        prefix = self.get_parameter("output_prefix").value.rstrip("/")
        self.estimate_types = [self._estimate_type(s) for s in self.outputs]
        if self.velocity_covariance and TWIST_COV in self.estimate_types and self.out_variance is None:
            raise HissError(f"velocity_covariance:=true, but {self.model_path} holds no validation error "
                            "(trained by an older hiss-train?): retrain it, or set velocity_covariance:=false")
        self.frame_ids = [self._frame_id(s, t) for s, t in zip(self.outputs, self.estimate_types, strict=True)]
        self.paths = [self._channel_paths(s, t) for s, t in zip(self.outputs, self.estimate_types, strict=True)]
        self.publishers_ = [
            self.create_publisher(message_class(t), f"{prefix}{s.topic}", 10)
            for s, t in zip(self.outputs, self.estimate_types, strict=True)
        ]
        self.diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.markers = (self.create_publisher(MarkerArray, f"{prefix}/markers", 10)
                        if self.get_parameter("publish_markers").value else None)
        self.create_timer(self.get_parameter("diagnostics_period_s").value, self._report)
        self.add_on_set_parameters_callback(self._on_parameters)
        self.get_logger().info(
            f"estimating {[s.topic for s in self.outputs]} from {[s.topic for s in self.inputs]} on {self.device}, "
            f"chunk {self.pipeline.config.chunk} at {self.pipeline.config.input_rate_hz} Hz"
        )

    # --- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _device(choice: str) -> str:
        if choice == "cuda" and not torch.cuda.is_available():
            raise HissError("device:=cuda, but torch sees no CUDA device")
        return "cuda" if choice in ("cuda", "auto") and torch.cuda.is_available() else "cpu"

    def _load(self, path: str) -> _Loaded:
        """Read and validate a checkpoint; nothing of the running node changes."""
        if not path:
            raise HissError("parameter model_path is empty: give a checkpoint (model.safetensors from hiss-train) "
                            "or the name of a shipped model (contact, broad_velocity)")
        path = str(shipped_model(path))
        ckpt = load_checkpoint(path)  # raises CheckpointError (a HissError) saying what is wrong
        dims = tuple(ckpt.data.get("input_dims") or ())
        if not dims:
            raise HissError(f"{path}: the checkpoint's data spec has no input_dims (made by an older hiss-train?)")
        cfg = TrainConfig.from_checkpoint(ckpt.data, config_to_dict(ckpt.config))
        norm = ckpt.normalization
        pipe_cfg = cfg.pipeline_config(dims)
        if self.max_gap_s > 0:  # the deployment's own tolerance for gaps instead of the training one
            pipe_cfg = dataclasses.replace(pipe_cfg, max_gap_s=self.max_gap_s)
        pipeline = Pipeline(pipe_cfg, Normalization(np.asarray(norm["input_mean"]), np.asarray(norm["input_std"])))
        variance = ckpt.data.get("validation", {}).get("mse_per_channel")
        return _Loaded(path, cfg, ckpt.model.to(self.device).eval(), pipeline,
                       np.asarray(norm["output_mean"]), np.asarray(norm["output_std"]),
                       None if variance is None else np.asarray(variance, dtype=np.float64))

    def _install(self, new: _Loaded) -> None:
        old_counters = self.pipeline.counters if getattr(self, "pipeline", None) else None
        self.model_path, self.inputs, self.outputs = new.path, new.cfg.inputs, new.cfg.outputs
        self.model, self.pipeline = new.model, new.pipeline
        self.out_mean, self.out_std, self.out_variance = new.out_mean, new.out_std, new.out_variance
        self._outgoing: list | None = None  # of this model; made on its first estimate (_outgoing_messages)
        if old_counters is not None:
            self.pipeline.counters.update(old_counters)
        self.state = self.model.init_state(1)
        self.episode = self.pipeline.episode

    def _on_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Hot reload: a new model_path is loaded and validated, then swapped in; a checkpoint
        that cannot be read or expects other streams is refused and the old model keeps running."""
        for p in params:
            if p.name != "model_path":
                continue
            try:
                new = self._load(p.value)
            except (HissError, OSError) as exc:
                return SetParametersResult(successful=False, reason=f"model_path refused: {exc}")
            mine = (self.inputs, self.outputs, self.pipeline.config)
            theirs = (new.cfg.inputs, new.cfg.outputs, new.pipeline.config)
            if mine != theirs:
                return SetParametersResult(successful=False, reason=(
                    f"model_path refused: {p.value} expects inputs {[s.to_dict() for s in new.cfg.inputs]}, outputs "
                    f"{[s.to_dict() for s in new.cfg.outputs]} at {new.pipeline.config}; the running model has "
                    f"{[s.to_dict() for s in self.inputs]}, {[s.to_dict() for s in self.outputs]} at "
                    f"{self.pipeline.config} (restart the node to change streams)"))
            if self.velocity_covariance and TWIST_COV in self.estimate_types and new.out_variance is None:
                return SetParametersResult(successful=False, reason=(
                    f"model_path refused: {p.value} holds no validation error for the velocity covariance "
                    "(trained by an older hiss-train?)"))
            self._warmup(new.model)
            self._install(new)
            gc.unfreeze()  # the old model may sit in reference cycles: let the collector free it
            freeze_heap()
            if self.step_backend == "compile":
                self._compile_in_background(new.model)
            self.reloads += 1
            self.get_logger().info(f"model swapped in: {p.value}")
        return SetParametersResult(successful=True)

    def _estimate_type(self, spec: StreamSpec) -> str:
        """The ground truth's own type; velocity derived from a pose is a twist, and twists carry
        a covariance (the validation error) when ``velocity_covariance`` is set."""
        kind = TWIST if spec.derive else spec.type
        return TWIST_COV if kind == TWIST and self.velocity_covariance else kind

    def _frame_id(self, spec: StreamSpec, msg_type: str) -> str:
        """A world-frame velocity is in the world frame; the rest in the tool (or their kind's) frame."""
        if spec.derive == "world_velocity":
            return self.get_parameter("world_frame_id").value
        own = {WRENCH: "wrench_frame_id", TWIST: "twist_frame_id", TWIST_COV: "twist_frame_id"}.get(msg_type)
        return (own and self.get_parameter(own).value) or self.get_parameter("frame_id").value

    @staticmethod
    def _channel_paths(spec: StreamSpec, msg_type: str) -> list[str]:
        """Where each estimated channel goes in the published message."""
        paths = [f"{ESTIMATE_FIELDS[spec.derive]}.{a}" for a in "xyz"] if spec.derive else list(spec.channel_names)
        if msg_type == TWIST_COV and spec.type != TWIST_COV:  # twist.linear.x -> twist.twist.linear.x
            paths = [f"twist.{p}" for p in paths]
        return paths

    def _warmup(self, model: Any) -> None:
        """Run the model twice (from a fresh and from a carried state) so the first real estimate
        pays no lazy initialisation."""
        cfg = model.config
        with torch.inference_mode():
            x = torch.zeros(1, cfg.chunk, cfg.input_dim, device=self.device)
            model.step_chunk(x, model.step_chunk(x, model.init_state(1))[1])

    def _compile(self, model: Any) -> str:
        """step_backend:=compile: compile the model's step and switch it over (its state carries
        over); returns the status for /diagnostics. A model it does not cover, or a compile that
        fails (no C++ compiler, ...), is logged and the model keeps the eager step."""
        began = time.monotonic()
        try:
            model.compile_step()
        except Exception as exc:  # ValueError (model not covered); Inductor fails in many ways
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            status = f"failed ({type(exc).__name__}: {first_line})"
            self.get_logger().error(f"step_backend:=compile {status}; the eager step stays")
            return status
        model.set_step_backend("compile")  # the next step_chunk takes it
        self.get_logger().info(f"compiled step in use ({time.monotonic() - began:.1f} s to compile)")
        return "in use"

    def _compile_in_background(self, model: Any) -> None:
        """After a hot reload: the new model estimates with the eager step while a thread compiles
        it. The compiler holds Python's GIL for up to ~0.5 s at a time, so estimates are late,
        and inputs beyond the QoS depth lost, until /diagnostics ``compile`` says ``in use``."""
        with self._compile_lock:
            self.compile_status = "compiling"

        def work() -> None:
            status = self._compile(model)
            with self._compile_lock:
                if model is self.model:  # not swapped out by another reload meanwhile
                    self.compile_status = status
            gc.unfreeze()  # what the compiler left, and a model swapped out meanwhile, go now, once
            freeze_heap()

        threading.Thread(target=work, name="hiss_compile", daemon=True).start()

    # --- data path --------------------------------------------------------------------------

    def _on_sample(self, i: int, msg: Any) -> None:
        spec = self.inputs[i]
        now_ns = self.get_clock().now().nanoseconds
        try:
            if self._readers[i] is None:
                self._readers[i] = value_reader(spec, msg)
            values = self._readers[i](msg)
        except (AttributeError, TypeError, ValueError) as exc:  # a message the checkpoint's fields do not fit
            self.rejected[i] += 1
            self.get_logger().warn(f"{spec.topic}: cannot read {list(spec.fields)} ({exc}); sample dropped",
                                   throttle_duration_sec=5.0)
            return
        stamp = message_stamp_ns(spec, msg, now_ns)
        self.received[i] += 1
        for chunk in self.pipeline.push(i, stamp, values):
            self._estimate(chunk)

    def _estimate(self, chunk: Any) -> None:
        t0 = time.perf_counter()
        if chunk.episode != self.episode:  # the input broke: start from a fresh state
            self.state = self.model.init_state(1)
            self.episode = chunk.episode
            self.resets += 1
        with torch.inference_mode():
            y = self._infer(torch.from_numpy(chunk.x).unsqueeze(0).to(self.device))
        self._publish(y[0].cpu().numpy().astype(np.float64) * self.out_std + self.out_mean, chunk.stamp_ns)
        self.estimates += 1
        self.latencies.append(time.perf_counter() - t0)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """One chunk x (1, chunk, I) -> normalised estimate (1, O); the state is carried."""
        y, self.state = self.model.step_chunk(x, self.state)
        return y

    def _publish(self, y: np.ndarray, stamp_ns: int) -> None:
        """Publish the physical-unit estimate y (O,) of the chunk ending at ``stamp_ns``."""
        if self._outgoing is None:
            self._outgoing = self._outgoing_messages()
        values = y.tolist()
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        k = 0
        for pub, msg, fields in self._outgoing:
            msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
            for obj, leaf in fields:
                setattr(obj, leaf, values[k])
                k += 1
            pub.publish(msg)  # serialised now: the message is reused for the next estimate
        if self.markers is not None:
            self._publish_markers(y, self._outgoing[0][1].header.stamp)

    def _outgoing_messages(self) -> list[tuple[Any, Any, list[tuple[Any, str]]]]:
        """Per output of this model: its publisher, a message to fill and publish at every
        estimate (frame id and covariance set once; building messages anew cost more than the
        model step), and where each channel goes in it (parent object, attribute)."""
        outgoing = []
        for pub, paths, frame, cov in zip(self.publishers_, self.paths, self.frame_ids,
                                          self._covariances_of_outputs(), strict=True):
            msg = pub.msg_type()
            msg.header.frame_id = frame
            if cov is not None:
                msg.twist.covariance = cov
            fields = []
            for path in paths:
                *parents, leaf = path.split(".")
                obj = msg
                for name in parents:
                    obj = getattr(obj, name)
                fields.append((obj, leaf))
            outgoing.append((pub, msg, fields))
        return outgoing

    def _covariances_of_outputs(self) -> list[np.ndarray | None]:
        """Per output, for TwistWithCovarianceStamped: a diagonal 6 x 6 covariance holding the
        validation MSE of each estimated channel and a large variance for components the model
        does not estimate; None for other types."""
        covs: list[np.ndarray | None] = []
        first = 0
        for paths, msg_type in zip(self.paths, self.estimate_types, strict=True):
            cov = None
            if msg_type == TWIST_COV:
                cov = np.zeros(36)
                cov[[7 * i for i in range(6)]] = UNKNOWN_VARIANCE
                if self.out_variance is not None:
                    for j, path in enumerate(paths):
                        row = _COV_ROW[".".join(path.split(".")[-2:])]  # (twist.)twist.linear.x -> linear.x
                        cov[7 * row] = self.out_variance[first + j]
            covs.append(cov)
            first += len(paths)
        return covs

    def _publish_markers(self, y: np.ndarray, stamp: Any) -> None:
        """One arrow from its frame's origin per output stream, along its first three channels."""
        arrows, k = MarkerArray(), 0
        for i, (spec, frame) in enumerate(zip(self.outputs, self.frame_ids, strict=True)):
            n = len(spec.channel_names)
            if n >= 3:
                m = Marker(type=Marker.ARROW, action=Marker.ADD, id=i, ns="hiss_estimates")
                m.header.stamp, m.header.frame_id = stamp, frame
                m.points = [Point(), Point(x=float(y[k]), y=float(y[k + 1]), z=float(y[k + 2]))]
                m.scale.x, m.scale.y, m.scale.z = 0.01, 0.02, 0.03
                m.color.a, m.color.r, m.color.g, m.color.b = 1.0, 0.9 - 0.5 * i, 0.3, 0.2 + 0.5 * i
                arrows.markers.append(m)
            k += n
        self.markers.publish(arrows)

    # --- diagnostics ------------------------------------------------------------------------

    def _report(self) -> None:
        for i, spec in enumerate(self.inputs):
            if self.received[i] == 0:
                self.get_logger().warn(f"waiting for data on {spec.topic}", throttle_duration_sec=5.0)
        lat = np.asarray(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        t_then, est_then, recv_then = self._rate_mark
        now = time.monotonic()
        span = max(now - t_then, 1e-9)
        self._rate_mark = (now, self.estimates, list(self.received))
        values = {
            "estimates": self.estimates, "estimate_rate_hz": f"{(self.estimates - est_then) / span:.1f}",
            "resets": self.resets, "device": self.device, "step_backend": self.model.step_backend,
            "compile": self.compile_status,
            "model_path": self.model_path, "reloads": self.reloads,
            "inference_ms_p50": f"{np.percentile(lat, 50):.3f}", "inference_ms_p99": f"{np.percentile(lat, 99):.3f}",
            **{f"publishers {s.topic}": sub.get_publisher_count()
               for s, sub in zip(self.inputs, self.subscriptions_, strict=True)},
            **{f"received {s.topic}": n for s, n in zip(self.inputs, self.received, strict=True)},
            **{f"rate_hz {s.topic}": f"{(n - m) / span:.1f}"
               for s, n, m in zip(self.inputs, self.received, recv_then, strict=True)},
            **{f"unreadable {s.topic}": n for s, n in zip(self.inputs, self.rejected, strict=True)},
            **{f"pipeline {k}": v for k, v in self.pipeline.counters.items()},
        }
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name="hiss_ros estimator", hardware_id="hiss_ros",
                                  message=f"{self.estimates} estimates")
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
