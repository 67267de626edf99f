"""Messages as bytes: inputs decoded from their serialized form, estimates written into it.

rclpy turns every message it takes into Python objects inside its executor, and every message it
publishes back into C structures: at IMU 1 kHz + tactile 100 Hz, a subscriber that only counts its
messages took 12-15 % of a core that way and 7-9 % raw (docs/BENCHMARKS.md, the rclpy floor).
The estimator subscribes ``raw`` instead and decodes with rosbags' CDR deserializer, the one that
reads the training bags, so live samples are read by the same code as the samples the model was
trained on; once that decoding is checked, a type whose size is fixed but for its header's
frame_id (Imu, WrenchStamped, ...) is read straight from the bytes at the offsets of its values
and stamp (``Layout``), with no message objects per sample. It publishes serialized bytes: each
outgoing message is serialized once, and each estimate is packed into a copy at the byte offsets
of its stamp and values.

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
from rosbags.interfaces import Nodetype

from hiss_ros.data.streams import StreamSpec, canonical_type, header_stamp_ns, message_values, resolve
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
        self.store, self._derived = store, 0
        self.fixed = self.rosbags is not None and Layout.applies(spec, self.type, store)
        self.layout: Layout | None = None  # values and stamp read from the bytes, once checked

    @property
    def backend(self) -> str:
        """What reads this stream now: ``bytes`` (its ``Layout``), ``rosbags`` or ``rclpy``."""
        return "bytes" if self.layout is not None else "rosbags" if self.rosbags else "rclpy"

    def __call__(self, data: bytes) -> Any:
        try:
            if self.checked:
                return self.rosbags(data, self.type)
            own = deserialize_message(data, self.cls)
        except Exception as exc:  # truncated or foreign bytes: each library fails in its own way
            raise ValueError(f"{len(data)} bytes do not decode as {self.type} ({type(exc).__name__})") from None
        return own if self.rosbags is None else self._first(data, own)

    def read(self, data: bytes) -> tuple[np.ndarray, int | None] | None:
        """(values, header stamp in ns or None) of a message straight from its bytes, with no message
        objects, once rosbags is checked for this stream and where its type has a fixed layout
        (``Layout``); None: decode it (``__call__``) and read the object instead. A message whose
        frame_id changed length gets its layout derived again (a few times, then the objects)."""
        layout = self.layout
        if layout is not None and layout.fits(data):
            return layout(data)
        if not (self.checked and self.fixed) or self._derived >= 8:
            return None
        self._derived += 1
        layout = Layout.derive(data, self.spec, self.type, self.store)
        if layout is None:
            return None
        self.layout = layout
        return layout(data)

    def stamp_ns(self, data: bytes) -> int | None:
        """The header stamp of a message straight from its bytes (its ``Layout``); None where it
        has no layout yet, or one these bytes do not fit."""
        layout = self.layout
        return layout.stamp_ns(data) if layout is not None and layout.stamped and layout.fits(data) else None

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
            self.warn(f"{self.spec.relative_topic}: the installed {self.type} is not ROS 2 Jazzy's standard "
                      "definition (rosbags reads its bytes differently): decoding it with rclpy instead")
            return own
        self.checked = True
        return ours


_FLOATS = {"double": "d", "float64": "d", "float": "f", "float32": "f"}
_SEC, _NANOSEC = 0x5EC0DE01, 0x0A11CE55  # stamp sentinels, unlikely elsewhere in a message


class Layout:
    """Where one stream's values and header stamp sit in the bytes of its messages, for a type
    whose size is fixed but for its header's frame_id (a ``std_msgs/Header`` first, every other
    field of fixed size: Imu, WrenchStamped, Vector3Stamped, ...): every message of the same length
    and frame_id length has them at the same offsets, read with one ``struct`` unpack. Derived
    from a message by writing sentinels into the fields with rosbags and finding their bytes, as
    ``Template`` does for estimates, then checked against rosbags' decoding of that message."""

    def __init__(self, data: bytes, unpack: struct.Struct, order: np.ndarray | None, stamped: bool) -> None:
        # what must match: the size, the encapsulation (endianness) and, after the stamp, the frame_id's length
        self.size, self.head = len(data), data[:16] if stamped else data[:4]
        self.unpack, self.order, self.stamped = unpack, order, stamped
        self.stamp = struct.Struct(unpack.format[0] + "iI")

    def fits(self, data: bytes) -> bool:
        return len(data) == self.size and data[:4] == self.head[:4] and data[12:len(self.head)] == self.head[12:]

    def __call__(self, data: bytes) -> tuple[np.ndarray, int | None]:
        got = self.unpack.unpack_from(data)
        values = np.array(got[2:] if self.stamped else got, dtype=np.float64)
        if self.order is not None:
            values = values[self.order]
        return values, (got[0] * 1_000_000_000 + got[1] if self.stamped else None)

    def stamp_ns(self, data: bytes) -> int:
        """The header stamp alone (a stamped layout: sec and nanosec right after the encapsulation)."""
        sec, nanosec = self.stamp.unpack_from(data, 4)
        return sec * 1_000_000_000 + nanosec

    @staticmethod
    def _stamped(fields: list[Any]) -> bool:
        return bool(fields) and fields[0][0] == "header" and fields[0][1] == (Nodetype.NAME, "std_msgs/msg/Header")

    @classmethod
    def applies(cls, spec: StreamSpec, msg_type: str, store: Any) -> bool:
        """Whether ``spec``'s messages have a layout: a fixed size but for a first header's frame_id,
        and every field of the stream one value (no slice)."""
        fields = store.fielddefs[msg_type][1]
        return _fixed_size(store, fields[1:] if cls._stamped(fields) else fields) and not any(
            isinstance(step.index, slice) for steps in spec.steps for step in steps)

    @classmethod
    def derive(cls, data: bytes, spec: StreamSpec, msg_type: str, store: Any) -> Layout | None:
        """The layout of messages like ``data`` (a type it ``applies`` to), checked on it; None where
        that fails (bytes that do not decode, a field that is not a float)."""
        stamped = cls._stamped(store.fielddefs[msg_type][1])
        try:
            msg = store.deserialize_cdr(data, msg_type)
            expected = message_values(spec, msg), header_stamp_ns(msg)
            endian, slots = "<" if data[1] & 1 else ">", []
            if stamped:
                msg.header.stamp.sec, msg.header.stamp.nanosec = _SEC, _NANOSEC
            for k, steps in enumerate(spec.steps):
                slots.append(_sentinel_slot(msg, steps, -1.2345678e-7 * (k + 3.5), endian, store, msg_type))
            if stamped:
                sentinels = bytes(store.serialize_cdr(msg, msg_type))
                stamp = [("i", _find(sentinels, endian, "i", _SEC, "sec")),
                         ("I", _find(sentinels, endian, "I", _NANOSEC, "nanosec"))]
                slots = stamp + slots
            at = sorted(range(len(slots)), key=lambda j: slots[j][1])
            fmt, end = endian, 0
            for j in at:
                code, offset = slots[j]
                if offset < end:
                    return None
                fmt += f"{offset - end}x{code}" if offset > end else code
                end = offset + struct.calcsize(code)
            n = 2 if stamped else 0
            if stamped and (slots[0][1], slots[1][1]) != (4, 8):  # the stamp first, right after the encapsulation
                return None
            value_at = [j - n for j in at[n:]]
            order = None if value_at == sorted(value_at) else np.argsort(value_at)
            layout = cls(data, struct.Struct(fmt), order, stamped)
            values, stamp = layout(data)
        except Exception:  # a field rosbags cannot hold a sentinel in, bytes it does not decode: no layout
            return None
        if not (np.array_equal(values, expected[0], equal_nan=True) and stamp == expected[1]):
            return None
        return layout


def _fixed_size(store: Any, fields: list[Any]) -> bool:
    """Whether ``fields`` (rosbags field definitions) serialize to the same size whatever their values."""
    for _, (node, detail) in fields:
        if node == Nodetype.ARRAY:
            node, detail = detail[0]
        if node == Nodetype.SEQUENCE or (node == Nodetype.BASE and detail[0] in ("string", "wstring")):
            return False
        if node == Nodetype.NAME and not _fixed_size(store, store.fielddefs[detail][1]):
            return False
    return True


def _sentinel_slot(msg: Any, steps: tuple[Any, ...], value: float, endian: str, store: Any,
                   msg_type: str) -> tuple[str, int]:
    """Write ``value`` into the float field at ``steps`` of the rosbags message ``msg`` and find it in
    its bytes: (struct code, offset); ValueError for a field that is not a float or not found once."""
    obj, last = resolve(msg, steps[:-1]), steps[-1]
    if not isinstance(resolve(msg, steps), (float, np.floating)):
        raise ValueError(f"{last.name} is not a float")
    if last.index is None:
        setattr(obj, last.name, value)
    else:  # rosbags' arrays are read-only views of the bytes: write into a copy
        array = np.array(getattr(obj, last.name))
        array[last.index] = value
        setattr(obj, last.name, array)
    data = bytes(store.serialize_cdr(msg, msg_type))
    for code in ("d", "f"):
        try:
            return code, _find(data, endian, code, value, last.name)
        except ValueError:
            continue
    raise ValueError(f"{last.name}: not found in the bytes")


def _find(data: bytes, endian: str, code: str, value: float, what: str) -> int:
    """The offset of ``value`` packed as ``code`` in ``data``; ValueError where it is not there once."""
    needle = struct.pack(endian + code, value)
    at = data.find(needle)
    if at < 0 or data.find(needle, at + 1) >= 0:
        raise ValueError(f"{what}: its bytes are {'not found' if at < 0 else 'ambiguous'} in the message")
    return at


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
        self.sec = _find(data, self.endian, "i", _SEC, "sec")
        self.nanosec = _find(data, self.endian, "I", _NANOSEC, "nanosec")
        self.slots: list[tuple[struct.Struct, int]] = []
        for k, (path, (code, put)) in enumerate(zip(paths, fields, strict=True)):
            if code is None:
                raise ValueError(f"{path} is not a float field")
            put(sentinel := -1.2345678e-7 * (k + 3.5))
            at = _find(serialize_message(msg), self.endian, code, sentinel, path)
            self.slots.append((struct.Struct(self.endian + code), at))
        self.bytes = bytearray(serialize_message(msg))
        values = np.random.default_rng(0).standard_normal(len(paths)).astype(np.float32).tolist()  # exact in both
        made = self.fill(values, 1_234_567_890_123_456_789)
        for (_, put), v in zip(fields, values, strict=True):
            put(v)
        stamp.sec, stamp.nanosec = 1_234_567_890, 123_456_789
        if deserialize_message(made, type(msg)) != msg:  # not the bytes: CDR padding is left uninitialised
            raise ValueError("the filled template does not decode to the message filled alike")

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
