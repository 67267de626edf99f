"""Estimates -> ROS messages: which message type each output is published as, where each
estimated channel goes in it, its frame and covariance, and RViz arrows.

Messages are built and serialized once per model; each estimate is packed into a copy of the
bytes and published serialized (``hiss_ros.nodes.wire``): building and converting message
objects at every estimate cost more than the model step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point
from visualization_msgs.msg import Marker, MarkerArray

from hiss_ros.data.streams import StreamSpec
from hiss_ros.errors import HissError
from hiss_ros.nodes.wire import Filler, Template, outgoing
from hiss_ros.serving import ServingSpec

# What an estimate of each ground-truth type is published as, and where its channels go.
ESTIMATE_FIELDS = {"world_velocity": "twist.linear", "body_velocity": "twist.linear"}
TWIST, TWIST_COV, WRENCH = ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/TwistWithCovarianceStamped",
                            "geometry_msgs/msg/WrenchStamped")
# Row of a TwistWithCovariance covariance (6 x 6, row-major: vx vy vz wx wy wz) per channel.
_COV_ROW = {f"{part}.{a}": 3 * j + i for j, part in enumerate(("linear", "angular")) for i, a in enumerate("xyz")}
UNKNOWN_VARIANCE = 1.0e6  # a twist component the model does not estimate (robot_localization's convention)


def frames(params: dict[str, Any]) -> Callable[[StreamSpec, str], str]:
    """The frame of each estimate, from the node's parameters: a world-frame velocity in
    ``world_frame_id``; the rest in their kind's frame (``wrench_frame_id``, ``twist_frame_id``), or
    ``frame_id`` where that is empty."""
    def frame_of(stream: StreamSpec, msg_type: str) -> str:
        if stream.derive == "world_velocity":
            return params["world_frame_id"]
        own = {WRENCH: "wrench_frame_id", TWIST: "twist_frame_id", TWIST_COV: "twist_frame_id"}.get(msg_type)
        return (own and params[own]) or params["frame_id"]

    return frame_of


def estimate_type(spec: StreamSpec, covariance: bool) -> str:
    """The ground truth's own type; velocity derived from a pose is a twist, and twists carry a
    covariance (the validation error) when ``covariance`` is set."""
    kind = TWIST if spec.derive else spec.type
    return TWIST_COV if kind == TWIST and covariance else kind


def channel_paths(spec: StreamSpec, msg_type: str) -> list[str]:
    """Where each estimated channel of ``spec`` goes in a ``msg_type`` message."""
    paths = [f"{ESTIMATE_FIELDS[spec.derive]}.{a}" for a in "xyz"] if spec.derive else list(spec.channel_names)
    if msg_type == TWIST_COV and spec.type != TWIST_COV:  # twist.linear.x -> twist.twist.linear.x
        paths = [f"twist.{p}" for p in paths]
    return paths


def diagonal_index(path: str) -> int:
    """The flat index, in a row-major 6 x 6 twist covariance, of the diagonal entry of the channel
    at ``path`` ((twist.)twist.linear.x -> linear.x -> 0)."""
    return 7 * _COV_ROW[".".join(path.split(".")[-2:])]


def twist_covariance(paths: list[str], variances: np.ndarray | None) -> np.ndarray:
    """A diagonal 6 x 6 covariance (row-major) holding ``variances`` of the estimated channels at
    ``paths`` and a large variance for the components the model does not estimate."""
    cov = np.zeros(36)
    cov[[7 * i for i in range(6)]] = UNKNOWN_VARIANCE
    if variances is not None:
        for path, v in zip(paths, variances, strict=True):
            cov[diagonal_index(path)] = v
    return cov


def output_names(types: list[str], streams: list[StreamSpec]) -> list[str]:
    """The node's private topic per output: ``~/wrench``, ``~/twist``, else the ground truth's own
    last name (``/mocap/pose`` -> ``~/pose``); a second output of the same name gets ``_2``."""
    kinds = {WRENCH: "wrench", TWIST: "twist", TWIST_COV: "twist"}
    names: list[str] = []
    for msg_type, stream in zip(types, streams, strict=True):
        base = kinds.get(msg_type) or stream.topic.rstrip("/").rsplit("/", 1)[-1]
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return [f"~/{n}" for n in names]


@dataclass
class _Outgoing:
    """One output stream: its publisher and message (a serialized template), and the variances'."""

    publisher: Any
    message: Template | Filler  # the channels, then (a twist with covariance) their variances' diagonal slots
    size: int
    covariance: bool  # per-estimate variances go into the message's covariance diagonal
    variance: tuple[Any, Template | Filler] | None  # other types: a companion message of variances


class EstimateMessages:
    """Per output stream of a model: a message to refill and publish at every estimate. A model
    that predicts its own variance (``per_estimate``) publishes twists with that variance as
    covariance diagonal, and every other output's variances on a companion topic
    ``<topic>_variance`` of the same type (no stamped wrench with covariance exists in ROS)."""

    def __init__(self, spec: ServingSpec, covariance: bool, frame_of: Callable[[StreamSpec, str], str],
                 publisher_of: Callable[[str, str], Any], per_estimate: bool = False) -> None:
        """``frame_of(stream, msg_type)`` -> frame id; ``publisher_of(topic, msg_type)`` -> publisher."""
        self.types = [estimate_type(s, covariance or per_estimate) for s in spec.outputs]
        if covariance and not per_estimate and TWIST_COV in self.types and spec.validation_mse is None:
            raise HissError("velocity_covariance:=true, but the model holds no validation error (trained by an "
                            "older hiss-train?): retrain it, or set velocity_covariance:=false")
        self.frames = [frame_of(s, t) for s, t in zip(spec.outputs, self.types, strict=True)]
        self.topics = output_names(self.types, list(spec.outputs))
        self.outgoing: list[_Outgoing] = []
        first, mse = 0, spec.validation_mse
        for stream, msg_type, frame, topic in zip(spec.outputs, self.types, self.frames, self.topics, strict=True):
            pub = publisher_of(topic, msg_type)
            msg = pub.msg_type()
            msg.header.frame_id = frame
            paths = channel_paths(stream, msg_type)
            slots, companion = list(paths), None
            if msg_type == TWIST_COV:
                msg.twist.covariance = twist_covariance(paths, None if mse is None else mse[first:first + len(paths)])
                if per_estimate:
                    slots += [f"twist.covariance[{diagonal_index(p)}]" for p in paths]
            elif per_estimate:
                var_pub = publisher_of(f"{topic}_variance", msg_type)
                var_msg = var_pub.msg_type()
                var_msg.header.frame_id = frame
                companion = (var_pub, outgoing(var_msg, paths))
            self.outgoing.append(_Outgoing(pub, outgoing(msg, slots), len(paths), len(slots) > len(paths), companion))
            first += len(paths)
        self.sizes = [len(s.channel_names) for s in spec.outputs]

    def publish(self, values: np.ndarray, stamp_ns: int, variance: np.ndarray | None = None) -> None:
        """Publish the physical-unit estimate (O,) of the chunk ending at ``stamp_ns`` (and its
        per-channel variance (O,), when the model predicts one)."""
        flat = values.tolist()
        var = variance.tolist() if variance is not None else None
        k = 0
        for out in self.outgoing:
            own = flat[k:k + out.size]
            if out.covariance:
                own += var[k:k + out.size]
            out.publisher.publish(out.message.fill(own, stamp_ns))
            if var is not None and out.variance is not None:
                out.variance[0].publish(out.variance[1].fill(var[k:k + out.size], stamp_ns))
            k += out.size

    def arrows(self, values: np.ndarray, stamp_ns: int) -> MarkerArray:
        """One arrow from its frame's origin per output stream, along its first three channels."""
        arrows, k = MarkerArray(), 0
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        stamp = Time(sec=sec, nanosec=nanosec)
        for i, (n, frame) in enumerate(zip(self.sizes, self.frames, strict=True)):
            if n >= 3:
                m = Marker(type=Marker.ARROW, action=Marker.ADD, id=i, ns="hiss_estimates")
                m.header.stamp, m.header.frame_id = stamp, frame
                m.points = [Point(), Point(x=float(values[k]), y=float(values[k + 1]), z=float(values[k + 2]))]
                m.scale.x, m.scale.y, m.scale.z = 0.01, 0.02, 0.03
                m.color.a, m.color.r, m.color.g, m.color.b = 1.0, 0.9 - 0.5 * i, 0.3, 0.2 + 0.5 * i
                arrows.markers.append(m)
            k += n
        return arrows
