"""Stream specifications: which topic, of which message type, and which fields become channels.

A field is a dotted attribute path into the message (``linear_acceleration.x``) or ``data``
for a whole numeric array (``std_msgs/msg/Float32MultiArray``). Message objects may come from
rosbags (bag files) or rclpy (live topics): both expose the same attribute names, so the same
spec extracts the same numbers in the trainer and in the estimator node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from hiss_ros.data.derive import DERIVATIONS, POSE_FIELDS
from hiss_ros.errors import ConfigError

# Supported message types -> whether they carry std_msgs/Header (stamp = header.stamp);
# header-less types are stamped with the bag's receive time (or on receipt, live).
SUPPORTED_TYPES: dict[str, bool] = {
    "sensor_msgs/msg/Imu": True,
    "sensor_msgs/msg/MagneticField": True,
    "std_msgs/msg/Float32MultiArray": False,
    "std_msgs/msg/Float64MultiArray": False,
    # A stamped array for a tactile skin or any other array sensor: its values in ``position``
    # (or ``effort``), the names optional. Stamped at the source, it needs no stamping on receipt.
    "sensor_msgs/msg/JointState": True,
    "geometry_msgs/msg/WrenchStamped": True,
    "geometry_msgs/msg/TwistStamped": True,
    "geometry_msgs/msg/TwistWithCovarianceStamped": True,
    "geometry_msgs/msg/PoseStamped": True,
    "nav_msgs/msg/Odometry": True,
}


@dataclass(frozen=True)
class StreamSpec:
    """One input or output stream: ``topic`` of message ``type``; ``fields`` give its channels."""

    topic: str
    type: str
    fields: tuple[str, ...] = field(default_factory=tuple)
    derive: str | None = None  # "world_velocity" | "body_velocity" from a pose stream (hiss_ros.data.derive)

    def __post_init__(self) -> None:
        where = f"stream {self.topic!r}"
        if not isinstance(self.topic, str) or not self.topic.startswith("/"):
            raise ConfigError(f"{where}: topic must be an absolute name such as '/imu/data'")
        if self.type not in SUPPORTED_TYPES:
            raise ConfigError(
                f"{where}: message type {self.type!r} is not supported; supported: {sorted(SUPPORTED_TYPES)}"
            )
        if self.derive is not None:
            if self.derive not in DERIVATIONS:
                raise ConfigError(f"{where}: derive = {self.derive!r}: expected one of {list(DERIVATIONS)}")
            if self.type not in POSE_FIELDS:
                raise ConfigError(f"{where}: derive needs a pose stream ({sorted(POSE_FIELDS)}), not {self.type}")
            if self.fields:
                raise ConfigError(f"{where}: give either fields or derive, not both")
            object.__setattr__(self, "fields", POSE_FIELDS[self.type])
        fields = tuple(self.fields) if not isinstance(self.fields, str) else (self.fields,)
        if not fields or not all(isinstance(f, str) and f for f in fields):
            raise ConfigError(f"{where}: fields must be a non-empty list of dotted paths, got {self.fields!r}")
        object.__setattr__(self, "fields", fields)

    @property
    def has_header(self) -> bool:
        return SUPPORTED_TYPES[self.type]

    @property
    def channel_names(self) -> list[str]:
        """Names of the channels this stream yields (after any derivation)."""
        if self.derive:
            return [f"{self.derive}.{a}" for a in "xyz"]
        return list(self.fields)

    @classmethod
    def from_dict(cls, data: Any) -> StreamSpec:
        if not isinstance(data, dict) or set(data) - {"topic", "type", "fields", "derive"}:
            raise ConfigError(f"stream: expected {{topic, type, fields}} (or derive instead of fields), got {data!r}")
        try:
            return cls(data["topic"], data["type"], tuple(data.get("fields") or ()), data.get("derive"))
        except KeyError as exc:
            raise ConfigError(f"stream {data.get('topic')!r}: missing key {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        if self.derive:
            return {"topic": self.topic, "type": self.type, "derive": self.derive}
        return {"topic": self.topic, "type": self.type, "fields": list(self.fields)}


def _resolve(msg: Any, path: str) -> Any:
    obj = msg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_fields(spec: StreamSpec, msg: Any) -> None:
    """Raise naming the first field path that the message does not have or that is not numeric."""
    for path in spec.fields:
        try:
            value = _resolve(msg, path)
        except AttributeError:
            raise ConfigError(
                f"stream {spec.topic!r}: {spec.type} has no field {path!r}"
                f" (fields at the top level: {sorted(_public_fields(msg))})"
            ) from None
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise ConfigError(f"stream {spec.topic!r}: field {path!r} of {spec.type} is not numeric")


def _public_fields(msg: Any) -> list[str]:
    names = getattr(msg, "__dataclass_fields__", None) or getattr(msg, "__slots__", ())
    return [n.lstrip("_") for n in names if not n.startswith("__")]


def message_values(spec: StreamSpec, msg: Any) -> np.ndarray:
    """The channels of one message as a float64 vector (scalars and arrays concatenated)."""
    return np.concatenate([np.atleast_1d(np.asarray(_resolve(msg, p), dtype=np.float64)) for p in spec.fields])


def value_reader(spec: StreamSpec, example: Any) -> Callable[[Any], np.ndarray]:
    """A faster ``message_values`` for messages shaped like ``example``: when every field is a
    scalar, one attrgetter call and one array construction per message."""
    if all(np.ndim(_resolve(example, p)) == 0 for p in spec.fields):
        get = attrgetter(*spec.fields)
        if len(spec.fields) == 1:
            return lambda msg: np.array([get(msg)], dtype=np.float64)
        return lambda msg: np.array(get(msg), dtype=np.float64)
    return lambda msg: message_values(spec, msg)


def message_stamp_ns(spec: StreamSpec, msg: Any, receive_ns: int) -> int:
    """header.stamp in integer nanoseconds where the type has a header, else ``receive_ns``."""
    if not spec.has_header:
        return int(receive_ns)
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def verdict(last_ns: int | None, stamp_ns: int, values: np.ndarray) -> str | None:
    """The one sample-hygiene rule of hiss_ros, for the trainer reading a bag and the live node
    alike: why a stream's sample (in arrival order) is not used, or None to use it. A sample is
    used when its values are finite and its stamp is later than the stream's last used one;
    late samples are dropped, never sorted back in (a live node cannot take back an estimate)."""
    if not np.isfinite(values).all():
        return "nonfinite"
    if last_ns is not None and stamp_ns <= last_ns:
        return "duplicate" if stamp_ns == last_ns else "out_of_order"
    return None
