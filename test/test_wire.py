"""Messages as bytes (hiss_ros.nodes.wire): inputs decoded by rosbags equal rclpy's decoding, or
give way to it; estimates packed into serialized templates decode with rclpy to the same messages."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_msgs.msg import TwistWithCovarianceStamped, Vector3, WrenchStamped
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from sensor_msgs.msg import Imu, Range
from std_msgs.msg import Float32MultiArray

from hiss_ros.data import StreamSpec
from hiss_ros.data.streams import message_values
from hiss_ros.nodes.wire import Decoder, Filler, Template, outgoing

IMU = StreamSpec("/imu/data", "sensor_msgs/msg/Imu", ("angular_velocity.x", "angular_velocity.z",
                                                      "linear_acceleration.y", "orientation_covariance[4]"))


def imu_bytes(k: int, frame: str = "imu_link") -> tuple[bytes, Imu]:
    msg = Imu()
    msg.header.frame_id = frame
    msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + k, 1000 * k
    msg.angular_velocity.x, msg.angular_velocity.z, msg.linear_acceleration.y = 0.1 * k, -2.5, 9.81 + k
    msg.orientation_covariance[4] = 0.01 * k
    return serialize_message(msg), msg


def test_standard_inputs_decode_with_rosbags_to_what_rclpy_reads():
    warned = []
    decode = Decoder(IMU, Imu, warned.append)
    assert decode.backend == "rosbags"
    for k, frame in enumerate(["imu_link", "", "a_much_longer_frame_name"]):  # the layout moves with the frame
        data, msg = imu_bytes(k, frame)
        got = decode(data)
        assert np.array_equal(message_values(IMU, got), message_values(IMU, msg))
        assert (got.header.stamp.sec, got.header.stamp.nanosec) == (100 + k, 1000 * k)
    assert decode.checked and decode.backend == "rosbags" and not warned


def test_a_definition_unlike_the_standard_one_falls_back_to_rclpy_once_said():
    """A typestore whose Vector3 has its fields in another order reads other values: found on the
    first message, said once, and every message is then decoded by rclpy, correctly."""
    store = get_typestore(Stores.EMPTY)
    store.register(get_types_from_msg("float64 z\nfloat64 y\nfloat64 x", "geometry_msgs/msg/Vector3"))
    spec = StreamSpec("/v", "geometry_msgs/msg/Vector3", ("x", "z"))
    warned = []
    decode = Decoder(spec, Vector3, warned.append, store)
    assert decode.backend == "rosbags"
    for k in range(3):
        got = decode(serialize_message(Vector3(x=1.0 + k, y=2.0, z=3.0)))
        assert message_values(spec, got).tolist() == [1.0 + k, 3.0]
    assert decode.backend == "rclpy" and len(warned) == 1 and "not ROS 2 Jazzy's standard" in warned[0]


def test_types_rosbags_does_not_know_are_decoded_by_rclpy():
    decode = Decoder(IMU, Imu, print, get_typestore(Stores.EMPTY))
    assert decode.backend == "rclpy"
    data, msg = imu_bytes(3)
    assert np.array_equal(message_values(IMU, decode(data)), message_values(IMU, msg))


@pytest.mark.parametrize("empty", [False, True])
def test_truncated_bytes_are_a_value_error_naming_the_type(empty):
    decode = Decoder(IMU, Imu, print, get_typestore(Stores.EMPTY) if empty else None)
    data, _ = imu_bytes(1)
    decode(data)
    with pytest.raises(ValueError, match=r"do not decode as sensor_msgs/msg/Imu"):
        decode(data[:40])


def test_a_filled_template_decodes_with_rclpy_to_the_estimate():
    msg = TwistWithCovarianceStamped()
    msg.header.frame_id = "base_link"
    msg.twist.covariance = np.arange(36, dtype=float) + 1e6
    paths = ["twist.twist.linear.x", "twist.twist.linear.y", "twist.covariance[0]", "twist.covariance[7]"]
    template = Template(msg, paths)
    assert isinstance(template, Template) and outgoing(TwistWithCovarianceStamped(), paths).__class__ is Template
    rng = np.random.default_rng(1)
    for stamp_ns in (0, 1_700_000_000_123_456_789, 5 * 10**9 + 999_999_999):
        values = rng.standard_normal(4).tolist()
        got = deserialize_message(template.fill(values, stamp_ns), TwistWithCovarianceStamped)
        assert got.header.stamp.sec * 10**9 + got.header.stamp.nanosec == stamp_ns
        assert got.header.frame_id == "base_link"
        assert [got.twist.twist.linear.x, got.twist.twist.linear.y] == values[:2]
        assert [got.twist.covariance[0], got.twist.covariance[7]] == values[2:]
        untouched = [i for i in range(36) if i not in (0, 7)]
        assert np.array_equal(got.twist.covariance[untouched], np.arange(36, dtype=float)[untouched] + 1e6)


def test_fields_a_template_cannot_hold_are_published_as_objects():
    with pytest.raises(ValueError, match="not a float field"):
        Template(Range(), ["radiation_type"])
    filler = outgoing(Range(), ["range", "radiation_type"])
    assert isinstance(filler, Filler)
    got = filler.fill([2.5, 1], 3 * 10**9 + 7)
    assert (got.range, got.radiation_type, got.header.stamp.sec, got.header.stamp.nanosec) == (2.5, 1, 3, 7)
    template = outgoing(WrenchStamped(), ["wrench.force.x", "wrench.torque.z"])  # float32 and float64 alike
    assert isinstance(template, Template)
    got = deserialize_message(template.fill([1.5, -0.25], 42), WrenchStamped)
    assert (got.wrench.force.x, got.wrench.torque.z, got.header.stamp.nanosec) == (1.5, -0.25, 42)
    assert isinstance(outgoing(Range(), ["range", "field_of_view"]), Template)  # float32 fields


def test_fixed_layout_inputs_are_read_from_their_bytes_as_rosbags_reads_them():
    """Once a stream is checked, an Imu (fixed size but for its header's frame_id) is read from its
    bytes: the values (one field before the others in the bytes, to reorder) and the header stamp
    equal the decoded message's, for every frame_id length; bytes that do not fit (truncated)
    are left to the decoder, and the layout survives them."""
    decode = Decoder(IMU, Imu, print)
    first, _ = imu_bytes(0)
    assert decode.fixed and decode.read(first) is None  # not before the first message has been checked
    decode(first)
    for k, frame in enumerate(["imu_link", "imu_link", "", "a_much_longer_frame_name", "imu_link"]):
        data, msg = imu_bytes(k + 1, frame)
        values, stamp = decode.read(data)
        assert np.array_equal(values, message_values(IMU, msg)) and values.dtype == np.float64
        assert stamp == (101 + k) * 10**9 + 1000 * (k + 1)
    layout = decode.layout
    assert decode.read(data[:-8]) is None and decode.layout is layout
    with pytest.raises(ValueError, match="do not decode"):
        decode(data[:-8])


def test_float32_and_headerless_fixed_types_read_alike_and_variable_ones_are_decoded():
    """A float32 field (Range) is read exactly; a type without a header (Vector3) has no stamp and
    its layout holds whatever its values; a type with a sequence (Float32MultiArray), a field that is
    a slice, and a type rosbags does not know are never read from the bytes."""
    spec = StreamSpec("/range", "sensor_msgs/msg/Range", ("range", "field_of_view"))
    decode = Decoder(spec, Range, print)
    msgs = [Range(range=1.5 + k / 8, field_of_view=0.1 * k) for k in range(3)]  # 0.1: not exact in float32
    for k, m in enumerate(msgs):
        m.header.stamp.sec = 7 + k
        if k == 0:
            decode(serialize_message(m))
        values, stamp = decode.read(serialize_message(m))
        assert values.tolist() == [1.5 + k / 8, float(np.float32(0.1 * k))] and stamp == (7 + k) * 10**9
    vec = StreamSpec("/v", "geometry_msgs/msg/Vector3", ("z", "x"))
    decode = Decoder(vec, Vector3, print)
    decode(serialize_message(Vector3(x=1.0, y=2.0, z=3.0)))
    for k in range(3):
        assert decode.read(serialize_message(Vector3(x=-1.0 * k, y=5.0, z=0.5 + k)))[0].tolist() == [0.5 + k, -1.0 * k]
    assert decode.read(serialize_message(Vector3()))[1] is None
    array = StreamSpec("/tactile", "std_msgs/msg/Float32MultiArray", ("data",))
    sliced = StreamSpec("/imu/data", "sensor_msgs/msg/Imu", ("orientation_covariance[0:3]",))
    assert not Decoder(array, Float32MultiArray, print).fixed and not Decoder(sliced, Imu, print).fixed
    assert not Decoder(IMU, Imu, print, get_typestore(Stores.EMPTY)).fixed
