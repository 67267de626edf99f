"""Bag reading: streams out of tiny bags written into tmp_path, and every bad-input message."""

from __future__ import annotations

import numpy as np
import pytest

from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.write import float_array, imu, replace_bag, wrench, write_bag
from hiss_ros.errors import BagError, ConfigError, HissError
from hiss_ros.pipeline import Pipeline, PipelineConfig

MS = 1_000_000
IMU = StreamSpec("/imu", "sensor_msgs/msg/Imu",
                 ("angular_velocity.x", "angular_velocity.y", "angular_velocity.z",
                  "linear_acceleration.x", "linear_acceleration.y", "linear_acceleration.z"))
TACTILE = StreamSpec("/tactile", "std_msgs/msg/Float32MultiArray", ("data",))
FORCE = StreamSpec("/wrench", "geometry_msgs/msg/WrenchStamped", ("wrench.force.x", "wrench.force.z"))


def records(n=40, header_offset_ms=3):
    """IMU and wrench with header stamps ``header_offset_ms`` before their receive time; tactile
    without header."""
    out = []
    for k in range(n):
        t = (1000 + 5 * k) * MS
        out.append(("/imu", t, imu(t - header_offset_ms * MS, (k, 2 * k, 3), (0, 0, 9.81))))
        out.append(("/wrench", t, wrench(t - header_offset_ms * MS, (k, 0, -k), (0, 0, 0))))
        if k % 2 == 0:
            out.append(("/tactile", t + MS, float_array([k, k + 0.5, -k, 1, 2])))
    return out


@pytest.mark.parametrize("storage, zstd", [("mcap", False), ("sqlite3", False), ("mcap", True), ("sqlite3", True)])
def test_streams_come_out_with_header_or_receive_stamps(tmp_path, storage, zstd):
    bag = write_bag(tmp_path / "b", records(), storage=storage, zstd=zstd)
    data = read_streams([bag], [IMU, TACTILE, FORCE], progress=False)
    s = data.streams["/imu"]
    assert s.values.shape == (40, 6)
    np.testing.assert_array_equal(s.stamps_ns, (1000 + 5 * np.arange(40) - 3) * MS)  # header.stamp
    np.testing.assert_array_equal(s.values[:, 1], 2 * np.arange(40))
    t = data.streams["/tactile"]
    assert t.values.shape == (20, 5)
    np.testing.assert_array_equal(t.stamps_ns, (1000 + 10 * np.arange(20)) * MS + MS)  # receive time
    np.testing.assert_array_equal(data.streams["/wrench"].values[:, 1], -np.arange(40))
    assert data.report["/imu"].messages == 40


def test_second_read_comes_from_cache(tmp_path):
    bag = write_bag(tmp_path / "b", records())
    first = read_streams([bag], [IMU, TACTILE], cache_dir=tmp_path / "cache", progress=False)
    second = read_streams([bag], [IMU, TACTILE], cache_dir=tmp_path / "cache", progress=False)
    assert not first.from_cache and second.from_cache
    for topic in ("/imu", "/tactile"):
        np.testing.assert_array_equal(first.streams[topic].values, second.streams[topic].values)
        np.testing.assert_array_equal(first.streams[topic].stamps_ns, second.streams[topic].stamps_ns)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other arrays"])
def test_corrupt_cache_entry_is_discarded_with_a_warning_and_rebuilt(tmp_path, caplog, damage):
    bag = write_bag(tmp_path / "b", records())
    first = read_streams([bag], [IMU, TACTILE], cache_dir=tmp_path / "cache", progress=False)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    blob = entry.read_bytes()
    if damage == "truncated":  # a crash or a full disk mid-write of an older version
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"not a zip archive at all")
    else:  # a valid archive without the expected arrays
        np.savez(entry, meta=np.frombuffer(b'{"topics": [], "report": {}}', dtype=np.uint8))
    with caplog.at_level("WARNING"):
        again = read_streams([bag], [IMU, TACTILE], cache_dir=tmp_path / "cache", progress=False)
    assert not again.from_cache and "discarding the corrupt bag cache entry" in caplog.text
    np.testing.assert_array_equal(again.streams["/imu"].values, first.streams["/imu"].values)
    assert read_streams([bag], [IMU, TACTILE], cache_dir=tmp_path / "cache", progress=False).from_cache  # rebuilt


def test_nonfinite_late_and_duplicate_samples_are_dropped_as_the_live_pipeline_drops_them(tmp_path):
    recs = [("/imu", (1000 + k) * MS, imu((1000 + k) * MS, (k, 0, 0), (0, 0, 0))) for k in range(10)]
    recs[3] = ("/imu", 1003 * MS, imu(1003 * MS, (np.nan, 0, 0), (0, 0, 0)))
    recs[5] = ("/imu", 1005 * MS, imu(1001 * MS + 1, (5, 0, 0), (0, 0, 0)))  # header stamp goes back
    recs[7] = ("/imu", 1007 * MS, imu(1006 * MS, (7, 0, 0), (0, 0, 0)))  # same stamp as sample 6
    bag = write_bag(tmp_path / "b", recs)
    data = read_streams([bag], [StreamSpec("/imu", IMU.type, ("angular_velocity.x",))], progress=False)
    rep = data.report["/imu"]
    assert (rep.nonfinite_dropped, rep.out_of_order, rep.duplicate_stamps_dropped) == (1, 1, 1)
    s = data.streams["/imu"]
    assert np.all(np.diff(s.stamps_ns) > 0)
    np.testing.assert_array_equal(s.values[:, 0], [0, 1, 2, 4, 6, 8, 9])  # in arrival order, late one dropped
    # The live pipeline, fed the same messages in the same order, keeps exactly these samples.
    pipe = Pipeline(PipelineConfig((1,), 1000.0, 100.0))
    for _, _, m in recs:
        pipe.push(0, m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, [m.angular_velocity.x])
    assert pipe.counters["accepted"] == len(s.values)
    assert (pipe.counters["nonfinite"], pipe.counters["out_of_order"], pipe.counters["duplicate"]) == (1, 1, 1)


def test_missing_topic_lists_what_the_bag_has(tmp_path):
    bag = write_bag(tmp_path / "b", records())
    with pytest.raises(BagError, match=r"no topic '/imu/data'; the bag has: /imu \[sensor_msgs/msg/Imu\], "
                                       r"/tactile \[std_msgs/msg/Float32MultiArray\]"):
        read_streams([bag], [StreamSpec("/imu/data", IMU.type, IMU.fields)], progress=False)


def test_type_mismatch_and_unknown_field_are_named(tmp_path):
    bag = write_bag(tmp_path / "b", records())
    with pytest.raises(BagError, match=r"topic '/wrench' is geometry_msgs/msg/WrenchStamped, but the config says"):
        read_streams([bag], [StreamSpec("/wrench", "geometry_msgs/msg/TwistStamped", ("twist.linear.x",))],
                     progress=False)
    with pytest.raises(ConfigError, match=r"sensor_msgs/msg/Imu has no field 'linear_accel\.x'"):
        read_streams([bag], [StreamSpec("/imu", IMU.type, ("linear_accel.x",))], progress=False)


def test_any_type_name_is_taken_and_ros1_names_mean_the_ros2_type():
    assert StreamSpec("/imu", "sensor_msgs/Imu", ("angular_velocity.x",)).type == "sensor_msgs/msg/Imu"
    assert StreamSpec("/t", "my_tactile/msg/Pads", ("cells[0:4]",)).type == "my_tactile/msg/Pads"
    for bad in ("Imu", "sensor_msgs/srv/Imu", "sensor_msgs//Imu", "a/b/c/d", 3):
        with pytest.raises(ConfigError, match="expected package/msg/Name"):
            StreamSpec("/camera", bad, ("data",))


def test_missing_empty_and_truncated_bags(tmp_path):
    with pytest.raises(BagError, match="no such bag"):
        read_streams([tmp_path / "nope.mcap"], [IMU], progress=False)
    from rosbags.rosbag2 import StoragePlugin, Writer

    from hiss_ros.data.write import TYPESTORE

    with Writer(tmp_path / "empty", version=9, storage_plugin=StoragePlugin.MCAP) as w:
        w.add_connection("/imu", IMU.type, typestore=TYPESTORE)
    with pytest.raises(BagError, match="topic '/imu' has no messages"):
        read_streams([tmp_path / "empty"], [IMU], progress=False)
    bag = write_bag(tmp_path / "b", records(n=200))
    mcap = next(bag.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with pytest.raises(BagError, match="cannot read bag"):
        read_streams([bag], [IMU], progress=False)


@pytest.mark.parametrize("frame", ["world_velocity", "body_velocity"])
def test_velocity_derived_from_motion_capture_pose(tmp_path, frame):
    """A body circling at 1 rad/s with radius 2 m, yawing with its motion: world velocity is
    tangential, body velocity is constant forward (x) at 2 m/s."""
    from scipy.spatial.transform import Rotation

    from hiss_ros.data.write import pose

    t = np.arange(0, 6, 0.01)  # 100 Hz mocap
    recs = []
    for ti in t:
        yaw = ti + np.pi / 2  # heading along the tangent
        q = Rotation.from_euler("z", yaw).as_quat()
        stamp = int(1e9 + ti * 1e9)
        recs.append(("/mocap", stamp, pose(stamp, (2 * np.cos(ti), 2 * np.sin(ti), 1.0), q)))
    bag = write_bag(tmp_path / "b", recs)
    spec = StreamSpec.from_dict({"topic": "/mocap", "type": "geometry_msgs/msg/PoseStamped", "derive": frame})
    v = read_streams([bag], [spec], progress=False).streams["/mocap"].values[20:-20]  # away from the ends
    if frame == "world_velocity":
        expected = np.stack([-2 * np.sin(t), 2 * np.cos(t), 0 * t], 1)[20:-20]
    else:
        expected = np.tile([2.0, 0.0, 0.0], (len(v), 1))
    np.testing.assert_allclose(v, expected, atol=2e-3)
    assert spec.channel_names == [f"{frame}.{a}" for a in "xyz"]


def test_derive_needs_a_pose_stream():
    with pytest.raises(ConfigError, match="derive needs a pose stream"):
        StreamSpec.from_dict({"topic": "/imu", "type": "sensor_msgs/msg/Imu", "derive": "body_velocity"})
    with pytest.raises(ConfigError, match="derive = 'speed'"):
        StreamSpec.from_dict({"topic": "/p", "type": "geometry_msgs/msg/PoseStamped", "derive": "speed"})


def test_ros1_bags_are_read_too(tmp_path):
    """A ROS 1 .bag (written with rosbags' ROS 1 writer and Noetic message definitions)."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    T = ts.types
    path = tmp_path / "old.bag"
    with Writer(path) as w:
        conn = w.add_connection("/imu", "sensor_msgs/msg/Imu", typestore=ts)
        for k in range(20):
            stamp = (1000 + 5 * k) * MS
            sec, nsec = divmod(stamp, 1_000_000_000)
            vec = T["geometry_msgs/msg/Vector3"]
            msg = T["sensor_msgs/msg/Imu"](
                header=T["std_msgs/msg/Header"](seq=k, stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                                frame_id="imu"),
                orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
                orientation_covariance=np.zeros(9), angular_velocity=vec(x=float(k), y=0.0, z=0.0),
                angular_velocity_covariance=np.zeros(9), linear_acceleration=vec(x=0.0, y=0.0, z=9.81),
                linear_acceleration_covariance=np.zeros(9))
            w.write(conn, stamp, ts.serialize_ros1(msg, "sensor_msgs/msg/Imu"))
    data = read_streams([path], [IMU], progress=False)
    np.testing.assert_array_equal(data.streams["/imu"].values[:, 0], np.arange(20))
    np.testing.assert_array_equal(data.streams["/imu"].stamps_ns, (1000 + 5 * np.arange(20)) * MS)


def test_replace_bag_deletes_only_bags_and_only_with_force(tmp_path):
    replace_bag(tmp_path / "new", force=False)  # nothing there: nothing to do
    bag = tmp_path / "bag"
    bag.mkdir()
    for name in ("metadata.yaml", "bag_0.mcap", "ATTRIBUTION.md"):
        (bag / name).write_text("x")
    with pytest.raises(HissError, match="already exists; pass --force"):
        replace_bag(bag, force=False)
    replace_bag(bag, force=True, delete=False)  # would be replaced: kept for now
    assert bag.is_dir()
    replace_bag(bag, force=True)
    assert not bag.exists()
    single = tmp_path / "one.db3"
    single.write_text("x")
    replace_bag(single, force=True)
    assert not single.exists()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "bag_0.mcap").write_text("x")
    (mixed / "notes.txt").write_text("mine")
    with pytest.raises(HissError, match=r"holds more than a bag \(notes.txt\); not deleting"):
        replace_bag(mixed, force=True)
    for name in ("notes.txt", "metadata.yaml", "ATTRIBUTION.md", "data.zstd"):  # a bag's parts, not a bag
        lone = tmp_path / name
        lone.write_text("mine")
        with pytest.raises(HissError, match="is not a bag; not deleting"):
            replace_bag(lone, force=True)
        assert lone.is_file()
    assert (mixed / "notes.txt").is_file()


def test_a_stamped_array_sensor_as_joint_state_keeps_its_own_stamps(tmp_path):
    """The stamped alternative to a header-less Float32MultiArray skin: JointState.position."""
    from hiss_ros.data.write import joint_state

    recs = [("/skin", (1000 + 10 * k) * MS + 7 * MS, joint_state((1000 + 10 * k) * MS, [k, 2.0 * k, -k]))
            for k in range(20)]  # recorded 7 ms after its stamp
    bag = write_bag(tmp_path / "b", recs)
    spec = StreamSpec("/skin", "sensor_msgs/msg/JointState", ("position",))
    s = read_streams([bag], [spec], progress=False).streams["/skin"]
    np.testing.assert_array_equal(s.stamps_ns, (1000 + 10 * np.arange(20)) * MS)  # the header, not the receipt
    np.testing.assert_array_equal(s.values[:, 1], 2.0 * np.arange(20))
    assert read_streams([bag], [spec], progress=False).report["/skin"].stamp_source == "header"
