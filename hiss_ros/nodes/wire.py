"""Messages as bytes: inputs decoded from their serialized form, estimates written into it.

rclpy turns every message it takes into Python objects inside its executor, and every message it
publishes back into C structures: at IMU 1 kHz + tactile 100 Hz, a subscriber that only counts its
messages took 12-15 % of a core that way and 7-9 % raw (docs/BENCHMARKS.md, the rclpy floor).
The estimator subscribes ``raw`` instead and decodes with rosbags' CDR deserializer, the one that
reads the training bags, so live samples are read by the same code as the samples the model was
trained on. It publishes serialized bytes: each outgoing message is serialized once, and each
estimate is packed into a copy at the byte offsets of its stamp and values.

Both check themselves against rclpy's own serialization, and give way to it where they cannot
be sure: a type rosbags does not know, or whose installed definition differs from ROS 2 Jazzy's
(found on the first message, said once); an outgoing field that is not a float.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message

from hiss_ros.data.streams import StreamSpec, canonical_type, header_stamp_ns, message_values
from hiss_ros.data.types import typestore


class Decoder:
    """Serialized messages of one input stream -> message objects with the fields rclpy's have:
    rosbags' for the types its typestore knows, rclpy's for the rest. Raises ValueError for bytes
    that do not decode as the type."""

    def __init__(self, spec: StreamSpec, cls: type, warn: Callable[[str], None], store: Any = None) -> None:
        self.spec, self.cls, self.warn = spec, cls, warn
        self.type = canonical_type(spec.type)
        store = typestore() if store is None else store
        self.rosbags = store.deserialize_cdr if self.type in store.fielddefs else None
        self.checked = False  # rosbags decoded a readable message as rclpy does: rosbags alone from now on

    @property
    def backend(self) -> str:
        return "rosbags" if self.rosbags else "rclpy"

    def __call__(self, data: bytes) -> Any:
        try:
            if self.checked:
                return self.rosbags(data, self.type)
            own = deserialize_message(data, self.cls)
        except Exception as exc:  # truncated or foreign bytes: each library fails in its own way
            raise ValueError(f"{len(data)} bytes do not decode as {self.type} ({type(exc).__name__})") from None
        return own if self.rosbags is None else self._first(data, own)

    def _first(self, data: bytes, own: Any) -> Any:
        """Decode with rosbags too and compare what the stream reads (its values, its header stamp)
        with rclpy's decoding ``own``; the first that agree settle it (``checked``)."""
        expected = message_values(self.spec, own), header_stamp_ns(own)  # unreadable fields: the caller counts
        try:
            ours = self.rosbags(data, self.type)
            same = (np.array_equal(message_values(self.spec, ours), expected[0], equal_nan=True)
                    and header_stamp_ns(ours) == expected[1])
        except Exception:
            same = False
        if not same:
            self.rosbags = None
            self.warn(f"{self.spec.topic.lstrip('/')}: the installed {self.type} is not ROS 2 Jazzy's standard "
                      "definition (rosbags reads its bytes differently): decoding it with rclpy instead")
            return own
        self.checked = True
        return ours


_FLOATS = {"double": "d", "float64": "d", "float": "f", "float32": "f"}
_SEC, _NANOSEC = 0x5EC0DE01, 0x0A11CE55  # stamp sentinels, unlikely elsewhere in a message


class Template:
    """One outgoing message, serialized once with its fixed fields (frame, constant covariance),
    and the byte offsets of its stamp and of each value slot (``paths``: ``wrench.force.x``,
    ``twist.covariance[7]``), so that an estimate costs a copy and a few ``struct.pack_into``.
    ValueError where that cannot be trusted: a slot that is not a float, a value found nowhere or
    twice, or bytes that rclpy does not decode to the message filled with the same values."""

    def __init__(self, msg: Any, paths: list[str]) -> None:
        fields = [_field(msg, p) for p in paths]
        stamp = msg.header.stamp
        stamp.sec, stamp.nanosec = _SEC, _NANOSEC
        data = serialize_message(msg)
        self.endian = "<" if data[1] & 1 else ">"  # the CDR encapsulation header
        self.sec, self.nanosec = self._find(data, "i", _SEC, "sec"), self._find(data, "I", _NANOSEC, "nanosec")
        self.slots: list[tuple[struct.Struct, int]] = []
        for k, (path, (code, put)) in enumerate(zip(paths, fields, strict=True)):
            if code is None:
                raise ValueError(f"{path} is not a float field")
            put(sentinel := -1.2345678e-7 * (k + 3.5))
            self.slots.append((struct.Struct(self.endian + code), self._find(serialize_message(msg), code, sentinel,
                                                                             path)))
        self.bytes = bytearray(serialize_message(msg))
        values = np.random.default_rng(0).standard_normal(len(paths)).astype(np.float32).tolist()  # exact in both
        made = self.fill(values, 1_234_567_890_123_456_789)
        for (_, put), v in zip(fields, values, strict=True):
            put(v)
        stamp.sec, stamp.nanosec = 1_234_567_890, 123_456_789
        if deserialize_message(made, type(msg)) != msg:  # not the bytes: CDR padding is left uninitialised
            raise ValueError("the filled template does not decode to the message filled alike")

    def _find(self, data: bytes, code: str, value: float, path: str) -> int:
        needle = struct.pack(self.endian + code, value)
        at = data.find(needle)
        if at < 0 or data.find(needle, at + 1) >= 0:
            raise ValueError(f"{path}: its bytes are {'not found' if at < 0 else 'ambiguous'} in the message")
        return at

    def fill(self, values: list[float], stamp_ns: int) -> bytes:
        """The serialized message with ``values`` (one per path) at ``stamp_ns``."""
        buf, end = self.bytes, self.endian
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        struct.pack_into(end + "i", buf, self.sec, sec)
        struct.pack_into(end + "I", buf, self.nanosec, nanosec)
        for (fmt, at), v in zip(self.slots, values, strict=True):
            fmt.pack_into(buf, at, v)
        return bytes(buf)


class Filler:
    """``Template``'s stand-in for a message it cannot handle: the message object, refilled (rclpy
    serializes it at publish, so reusing it is safe)."""

    def __init__(self, msg: Any, paths: list[str]) -> None:
        self.msg, self.puts = msg, [put for _, put in (_field(msg, p) for p in paths)]

    def fill(self, values: list[float], stamp_ns: int) -> Any:
        self.msg.header.stamp.sec, self.msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        for put, v in zip(self.puts, values, strict=True):
            put(v)
        return self.msg


def outgoing(msg: Any, paths: list[str]) -> Template | Filler:
    """The cheapest sound way to publish ``msg`` with values at ``paths``."""
    try:
        return Template(msg, paths)
    except ValueError:
        return Filler(msg, paths)


def _field(msg: Any, path: str) -> tuple[str | None, Callable[[float], None]]:
    """(struct code, or None for a field that is not a float; a setter) of ``path`` in ``msg``:
    ``a.b.c`` or ``a.b[i]``."""
    *parents, leaf = path.split(".")
    obj = msg
    for name in parents:
        obj = getattr(obj, name)
    name, _, index = leaf.partition("[")
    kind = type(obj).get_fields_and_field_types().get(name, "")
    code = _FLOATS.get(kind.removeprefix("sequence<").split(",")[0].split(">")[0].split("[")[0])
    if index:
        array, i = getattr(obj, name), int(index.rstrip("]"))
        return code, lambda v: array.__setitem__(i, v)
    return code, lambda v: setattr(obj, name, v)
