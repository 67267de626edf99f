"""Stream specifications: which topic, of which message type, and which fields become channels.

Any message type, standard or custom: ``type`` is its ROS name (``sensor_msgs/msg/Imu``; the
ROS 1 form ``sensor_msgs/Imu`` means the same). Its definition comes from the bag for training
(see ``hiss_ros.data.bag``) and from the installed interface package for the live node.

A field is a path into the message: dotted attribute names, each optionally indexed or sliced as
in Python, e.g. ``linear_acceleration.x``, ``data`` (a whole numeric array), ``position[0:7]``,
``data[3]``, ``cells[2].force.z``. Every numeric scalar or array it reaches is a channel (arrays
give one channel per element). Message objects may come from rosbags (bag files) or rclpy (live
topics): both expose the same attribute names, so the same spec extracts the same numbers in the
trainer and in the estimator node.

Stamps: ``stamp: header`` uses ``header.stamp``; ``stamp: receive`` the bag's receive time (live:
the time the node receives it); ``stamp: auto`` (the default) the header where the type has one
and its stamps are real, else the receive time (drivers that leave stamps at zero are common).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from hiss_ros.data.derive import DERIVATIONS, POSE_FIELDS
from hiss_ros.errors import ConfigError

STAMPS = ("auto", "header", "receive")
_TYPE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)/(?:(msg)/)?([A-Za-z][A-Za-z0-9_]*)$")
_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(-?\d+)\]|\[(-?\d*):(-?\d*)\])?$")


def canonical_type(name: Any) -> str:
    """``sensor_msgs/Imu`` (ROS 1) or ``sensor_msgs/msg/Imu`` -> ``sensor_msgs/msg/Imu``."""
    m = _TYPE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ConfigError(f"message type {name!r}: expected package/msg/Name such as 'sensor_msgs/msg/Imu' "
                          "(or the ROS 1 form 'sensor_msgs/Imu')")
    return f"{m[1]}/msg/{m[3]}"


@dataclass(frozen=True)
class _Step:
    name: str
    index: int | slice | None


def parse_field(path: Any) -> tuple[_Step, ...]:
    """``cells[2].force.z`` -> its steps; ConfigError naming the part that is not a field name,
    ``name[i]`` or ``name[a:b]``."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"field {path!r}: expected a path such as 'linear_acceleration.x' or 'data[0:8]'")
    steps = []
    for part in path.split("."):
        m = _SEGMENT.match(part)
        if m is None:
            raise ConfigError(f"field {path!r}: {part!r} is not a field name, name[i] or name[start:stop]")
        if m[2] is not None:
            index: int | slice | None = int(m[2])
        elif m[3] is not None or m[4] is not None:
            index = slice(int(m[3]) if m[3] else None, int(m[4]) if m[4] else None)
        else:
            index = None
        steps.append(_Step(m[1], index))
    if any(isinstance(s.index, slice) for s in steps[:-1]):
        raise ConfigError(f"field {path!r}: only the last part may be a slice (index the others: name[i])")
    return tuple(steps)


def _public_fields(msg: Any) -> list[str]:
    rclpy_fields = getattr(msg, "get_fields_and_field_types", None)  # an rclpy message
    if callable(rclpy_fields):
        return list(rclpy_fields())
    names = getattr(msg, "__dataclass_fields__", None) or getattr(msg, "__slots__", ())
    return [n.lstrip("_") for n in names if not n.startswith("__")]


def resolve(msg: Any, steps: tuple[_Step, ...]) -> Any:
    """What the parsed field path ``steps`` (``StreamSpec.steps``) reaches in ``msg``."""
    obj = msg
    for step in steps:
        obj = getattr(obj, step.name)
        if step.index is not None:
            obj = obj[step.index]
    return obj


@dataclass(frozen=True)
class StreamSpec:
    """One input or output stream: ``topic`` of message ``type``; ``fields`` give its channels.

    ``stamp``: where a sample's time comes from (``STAMPS``, see the module). ``rate_hz``: the
    rate the stream is recorded at, checked against the bags; for an input, when it differs
    from the pipeline's ``input_rate_hz`` (a slower tactile array held on a faster IMU's clock)."""

    topic: str
    type: str
    fields: tuple[str, ...] = field(default_factory=tuple)
    derive: str | None = None  # "world_velocity" | "body_velocity" from a pose stream (hiss_ros.data.derive)
    stamp: str = "auto"
    rate_hz: float | None = None

    @property
    def relative_topic(self) -> str:
        """``topic`` without its leading slash, as a node subscribes to it: under its namespace, remappable."""
        return self.topic.lstrip("/")

    def __post_init__(self) -> None:
        where = f"stream {self.topic!r}"
        if not isinstance(self.topic, str) or not self.topic.startswith("/"):
            raise ConfigError(f"{where}: topic must be an absolute name such as '/imu/data'")
        try:
            object.__setattr__(self, "type", canonical_type(self.type))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.stamp not in STAMPS:
            raise ConfigError(f"{where}: stamp = {self.stamp!r}: expected one of {', '.join(STAMPS)}")
        if self.rate_hz is not None and (isinstance(self.rate_hz, bool) or not isinstance(self.rate_hz, (int, float))
                                         or not 0 < self.rate_hz < float("inf")):
            raise ConfigError(f"{where}: rate_hz = {self.rate_hz!r}: expected a positive number")
        if self.derive is not None:
            if self.derive not in DERIVATIONS:
                raise ConfigError(f"{where}: derive = {self.derive!r}: expected one of {list(DERIVATIONS)}")
            if self.type not in POSE_FIELDS:
                raise ConfigError(f"{where}: derive needs a pose stream ({sorted(POSE_FIELDS)}), not {self.type}")
            if self.fields:
                raise ConfigError(f"{where}: give either fields or derive, not both")
            object.__setattr__(self, "fields", POSE_FIELDS[self.type])
        fields = tuple(self.fields) if not isinstance(self.fields, str) else (self.fields,)
        if not fields:
            raise ConfigError(f"{where}: fields must be a non-empty list of paths, got {self.fields!r}")
        try:
            steps = tuple(parse_field(f) for f in fields)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "_steps", steps)

    @property
    def steps(self) -> tuple[tuple[_Step, ...], ...]:
        return self._steps  # type: ignore[attr-defined]

    @property
    def channel_names(self) -> list[str]:
        """Names of the channels this stream yields (after any derivation); a path that yields an
        array counts as one name here (its channels are named once the data is seen)."""
        if self.derive:
            return [f"{self.derive}.{a}" for a in "xyz"]
        return list(self.fields)

    @classmethod
    def from_dict(cls, data: Any) -> StreamSpec:
        keys = {"topic", "type", "fields", "derive", "stamp", "rate_hz"}
        if not isinstance(data, dict) or set(data) - keys:
            raise ConfigError(f"stream: expected {{topic, type, fields}} (or derive instead of fields; optional "
                              f"stamp, rate_hz), got {data!r}")
        fields = data.get("fields") or ()
        fields = (fields,) if isinstance(fields, str) else tuple(fields)  # ``fields: data``: one field, not its letters
        try:
            return cls(data["topic"], data["type"], fields, data.get("derive"),
                       data.get("stamp", "auto"), data.get("rate_hz"))
        except KeyError as exc:
            raise ConfigError(f"stream {data.get('topic')!r}: missing key {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"topic": self.topic, "type": self.type}
        out.update({"derive": self.derive} if self.derive else {"fields": list(self.fields)})
        if self.stamp != "auto":
            out["stamp"] = self.stamp
        if self.rate_hz is not None:
            out["rate_hz"] = self.rate_hz
        return out

    def as_read(self) -> dict[str, Any]:
        """``to_dict`` without what is checked but not read (``rate_hz``): what decides the data
        (the bag cache's key, whether a hot-reloaded model reads the same streams)."""
        return {k: v for k, v in self.to_dict().items() if k != "rate_hz"}

    def require_header(self, has_header: bool) -> None:
        """ConfigError when ``stamp: header`` is asked of a type without a header."""
        if self.stamp == "header" and not has_header:
            raise ConfigError(f"stream {self.topic!r}: stamp = header, but {self.type} has no header; "
                              "use stamp: receive (or auto)")


def check_fields(spec: StreamSpec, msg: Any, values: bool = True) -> None:
    """Raise naming the first field path that the message does not have or, with ``values``,
    that is not numeric or selects nothing (``values=False``: names only, for a default-built
    message whose arrays are still empty)."""
    for path, steps in zip(spec.fields, spec.steps, strict=True):
        obj, walked = msg, []
        for step in steps:
            if not hasattr(obj, step.name):
                at = ".".join(walked) or "the top level"
                raise ConfigError(f"stream {spec.topic!r}: {spec.type} has no field {path!r}"
                                  f" (fields at {at}: {sorted(_public_fields(obj))})")
            obj = getattr(obj, step.name)
            walked.append(step.name)
            if step.index is not None:
                if isinstance(obj, (str, bytes)) or not hasattr(obj, "__getitem__"):
                    raise ConfigError(f"stream {spec.topic!r}: field {'.'.join(walked)!r} of {spec.type} is not "
                                      f"an array, so {path!r} cannot index it")
                if isinstance(step.index, int) and not -len(obj) <= step.index < len(obj):
                    if not values:
                        break
                    raise ConfigError(f"stream {spec.topic!r}: {path!r}: index {step.index} is out of range "
                                      f"(the array has {len(obj)} elements)")
                obj = obj[step.index]
        else:
            if not values:
                continue
            arr = np.asarray(obj)
            if arr.dtype.kind not in "fiub":
                raise ConfigError(f"stream {spec.topic!r}: field {path!r} of {spec.type} is not numeric "
                                  f"(it holds {type(obj).__name__})")
            if arr.size == 0:
                raise ConfigError(f"stream {spec.topic!r}: field {path!r} of {spec.type} is empty in the first "
                                  "message: no channel to read")


def message_values(spec: StreamSpec, msg: Any) -> np.ndarray:
    """The channels of one message as a float64 vector (scalars and arrays concatenated)."""
    return np.concatenate([np.atleast_1d(np.asarray(resolve(msg, s), dtype=np.float64)).ravel()
                           for s in spec.steps])


def value_reader(spec: StreamSpec, example: Any) -> Callable[[Any], np.ndarray]:
    """A faster ``message_values`` for messages shaped like ``example``: when every field is a
    plain dotted path to a scalar, one attrgetter call and one array construction per message."""
    plain = all(s.index is None for steps in spec.steps for s in steps)
    if plain and all(np.ndim(resolve(example, s)) == 0 for s in spec.steps):
        get = attrgetter(*spec.fields)
        if len(spec.fields) == 1:
            return lambda msg: np.array([get(msg)], dtype=np.float64)
        return lambda msg: np.array(get(msg), dtype=np.float64)
    return lambda msg: message_values(spec, msg)


def header_stamp_ns(msg: Any) -> int | None:
    """``header.stamp`` in integer nanoseconds, or None for a message without a std_msgs/Header."""
    header = getattr(msg, "header", None)
    stamp = getattr(header, "stamp", None)
    if stamp is None:
        return None
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def uses_header(spec: StreamSpec, msg: Any) -> bool:
    """Whether ``spec``'s samples are stamped with ``msg``'s header (live ``auto``: a header whose
    stamp is set), rather than on receipt. ConfigError for ``stamp: header`` without a header."""
    stamp = header_stamp_ns(msg)
    spec.require_header(stamp is not None)
    return spec.stamp != "receive" and stamp is not None and (spec.stamp == "header" or stamp != 0)


def unusable_header_stamps(stamps_ns: np.ndarray) -> str | None:
    """Why a stream's header stamps (in arrival order) cannot time it, or None when they can: all
    zero (a driver that never sets them), or mostly repeated (one stamp per burst, a constant)."""
    n = len(stamps_ns)
    if n == 0:
        return None
    zero = int(np.count_nonzero(stamps_ns == 0))
    if zero * 2 > n:
        return f"{zero} of {n} header stamps are zero"
    repeats = int(np.count_nonzero(np.diff(stamps_ns) == 0)) if n > 1 else 0
    if repeats * 4 > n:  # a quarter: a real clock repeats a stamp rarely; one per burst of 2+ does often
        distinct = len(np.unique(stamps_ns))
        return f"{n} header stamps take only {distinct} distinct value{'s' if distinct > 1 else ''}"
    return None


def measured_rate_hz(stamps_ns: np.ndarray, max_gap_s: float, min_samples: int = 10) -> tuple[float, float] | None:
    """(samples per second, seconds measured) over the stream's stretches without a gap longer
    than ``max_gap_s``: intervals counted over their total length, which bursty delivery (receive
    stamps) does not bias. Stretches of fewer than ``min_samples`` samples are left out (a stream
    that only comes in short bursts would otherwise measure its in-burst spacing); None when no
    stretch is long enough."""
    d = np.diff(np.asarray(stamps_ns, dtype=np.int64))
    breaks = np.flatnonzero((d <= 0) | (d > max_gap_s * 1e9))
    edges = np.concatenate([[-1], breaks, [len(d)]])  # stretch k: intervals edges[k]+1 .. edges[k+1]-1
    count, total = 0, 0
    for lo, hi in zip(edges[:-1] + 1, edges[1:], strict=True):
        if hi - lo + 1 >= min_samples:
            count += hi - lo
            total += int(d[lo:hi].sum())
    if not count:
        return None
    return count * 1e9 / total, total / 1e9


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
