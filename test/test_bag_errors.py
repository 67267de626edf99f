"""Unreadable bags: real bags written into tmp_path, then damaged, each refused with one line that
names the cause and the fix (hiss_ros.data.bag_errors); and pose derivation refusing orientations
it cannot use (hiss_ros.data.derive)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.rosbag1 import Writer as Ros1Writer
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.bag_errors import explain
from hiss_ros.data.derive import velocity_from_pose
from hiss_ros.data.write import TYPESTORE, imu, pose, write_bag
from hiss_ros.errors import BagError
from hiss_ros.train.cli import main as train_main

MS = 1_000_000
IMU_TYPE = "sensor_msgs/msg/Imu"
IMU = StreamSpec("/imu", IMU_TYPE, ("angular_velocity.x", "linear_acceleration.z"))
ODOM = "nav_msgs/msg/Odometry"
T = TYPESTORE.types


def imu_records(n: int = 200) -> list:
    return [("/imu", (1000 + 5 * k) * MS, imu((1000 + 5 * k) * MS, (k, 0, 0), (0, 0, 9.81))) for k in range(n)]


def refused(paths, *needles: str, specs=(IMU,)) -> str:
    """The BagError line read_streams raises for ``paths``: one line, holding ``needles``."""
    with pytest.raises(BagError) as info:
        read_streams([Path(p) for p in paths], list(specs), progress=False)
    line = str(info.value)
    assert "\n" not in line, line
    for needle in needles:
        assert needle in line, line
    return line


def storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))


def edit_metadata(bag: Path, **info) -> None:
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())
    meta["rosbag2_bagfile_information"].update(info)
    (bag / "metadata.yaml").write_text(yaml.safe_dump(meta))


# --- rosbag2 folders and metadata.yaml -------------------------------------------------------------

@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_folder_without_metadata_says_reindex_or_pass_the_storage_file(tmp_path, storage):
    bag = write_bag(tmp_path / "b", imu_records(), storage=storage)
    (bag / "metadata.yaml").unlink()
    line = refused([bag], str(bag), "no metadata.yaml", "ros2 bag reindex", "single .db3 / .mcap file")
    assert line.startswith(f"{bag}: ")
    assert len(read_streams([storage_file(bag)], [IMU], progress=False).streams["/imu"].stamps_ns) == 200  # the hint


def test_metadata_of_a_newer_rosbag2_says_upgrade_rosbags(tmp_path):
    bag = write_bag(tmp_path / "b", imu_records())
    edit_metadata(bag, version=99)
    refused([bag], "newer rosbag2", "version 99", "upgrade rosbags")


def test_split_bag_with_a_file_missing_names_it(tmp_path):
    bag = write_bag(tmp_path / "b", imu_records())
    edit_metadata(bag, relative_file_paths=["b_0.mcap", "b_1.mcap"])  # as rosbag2 names split files
    storage_file(bag).rename(bag / "b_0.mcap")
    line = refused([bag], "missing: b_1.mcap;", "split bag needs all its files")
    assert "b_0.mcap" not in line


def test_damaged_metadata_says_rebuild_it(tmp_path):
    bag = write_bag(tmp_path / "b", imu_records())
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9}\n")
    refused([bag], "metadata.yaml is damaged", "ros2 bag reindex")


@pytest.mark.parametrize("info, needles", [
    ({"storage_identifier": "hdf5"}, ("storage plugin 'hdf5' is unsupported", "ros2 bag convert")),
    ({"compression_mode": "FILE", "compression_format": "lz4"}, ("compression format 'lz4' is unsupported",)),
])
def test_unsupported_storage_or_compression_is_named(tmp_path, info, needles):
    bag = write_bag(tmp_path / "b", imu_records())
    edit_metadata(bag, **info)
    refused([bag], *needles)


def test_unsupported_serialization_is_named(tmp_path):
    bag = write_bag(tmp_path / "b", imu_records())
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())
    topic = meta["rosbag2_bagfile_information"]["topics_with_message_count"][0]["topic_metadata"]
    topic["serialization_format"] = "json"
    (bag / "metadata.yaml").write_text(yaml.safe_dump(meta))
    refused([bag], "serialization format {'json'} is unsupported")


# --- truncated or damaged storage ------------------------------------------------------------------

@pytest.mark.parametrize("storage, fix", [("mcap", "mcap recover"), ("sqlite3", ".recover")])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_storage_says_truncated_and_how_to_recover(tmp_path, storage, fix, keep):
    bag = write_bag(tmp_path / "b", imu_records(), storage=storage)
    f = storage_file(bag)
    whole = f.read_bytes()
    f.write_bytes(whole[: int(len(whole) * keep)])
    refused([bag], str(bag), "truncated or damaged (still being recorded, or copied incompletely?)", fix,
            "ros2 bag reindex")


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_empty_storage_file_says_empty(tmp_path, storage):
    bag = write_bag(tmp_path / "b", imu_records(), storage=storage)
    storage_file(bag).write_bytes(b"")
    refused([bag], "empty", "still being recorded")


def test_sqlite_file_that_is_not_a_database(tmp_path):
    bag = write_bag(tmp_path / "b", imu_records(), storage="sqlite3")
    storage_file(bag).write_bytes(b"no database here " * 500)
    refused([bag], "file is not a database", "sqlite3 database is truncated or damaged", ".recover")


# --- sqlite3 layouts -------------------------------------------------------------------------------

def raw_db(path: Path, tables: str, rows: bool = True) -> Path:
    """A .db3 made by hand: ``tables`` (SQL), then, if ``rows``, one /imu topic and 20 messages."""
    with sqlite3.connect(path) as db:
        db.executescript(tables)
        if rows:
            db.execute("INSERT INTO topics VALUES (1, '/imu', ?, 'cdr')", (IMU_TYPE,))
            for k in range(20):
                t = (1000 + 5 * k) * MS
                db.execute("INSERT INTO messages VALUES (?, 1, ?, ?)",
                           (k + 1, t, TYPESTORE.serialize_cdr(imu(t, (k, 0, 0), (0, 0, 9.81)), IMU_TYPE)))
    return path


def test_database_without_the_rosbag2_tables_names_the_layout(tmp_path):
    db = raw_db(tmp_path / "old.db3", "CREATE TABLE messages(id INTEGER PRIMARY KEY, timestamp INTEGER, data BLOB);",
                rows=False)
    refused([db], "lacks the 'topics' and 'messages' tables", "it has: messages", "ros2 bag convert")


def test_database_without_tables_says_nothing_was_written(tmp_path):
    db = tmp_path / "none.db3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 1")  # a valid SQLite file with no table
    refused([db], "empty, without tables", "wait for the recording")


def test_the_oldest_rosbag2_layout_is_read(tmp_path):
    """The first rosbag2 releases' topics table had no offered_qos_profiles column; rosbags reads it."""
    db = raw_db(tmp_path / "dashing.db3",
                "CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT, type TEXT, serialization_format TEXT);"
                "CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER, timestamp INTEGER, data BLOB);")
    data = read_streams([db], [IMU], progress=False)
    np.testing.assert_array_equal(data.streams["/imu"].values[:, 0], np.arange(20))


# --- message definitions ---------------------------------------------------------------------------

def test_connection_without_definition_asks_for_msg_path(tmp_path):
    """A bag carrying some definitions but not all: rosbags then knows only the bag's types; a
    standard type is completed from Jazzy's, a custom one needs --msg-path."""
    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg("float64 value", "my_pkg/msg/Gauge"))
    bag = tmp_path / "b"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        ci = w.add_connection("/imu", IMU_TYPE, typestore=TYPESTORE)
        cg = w.add_connection("/gauge", "my_pkg/msg/Gauge", typestore=store)
        for _, t, msg in imu_records(10):
            w.write(ci, t, TYPESTORE.serialize_cdr(msg, IMU_TYPE))
            w.write(cg, t, store.serialize_cdr(store.types["my_pkg/msg/Gauge"](value=1.0), "my_pkg/msg/Gauge"))
    with sqlite3.connect(storage_file(bag)) as db:
        db.execute("DELETE FROM message_definitions WHERE topic_type = ?", (IMU_TYPE,))
    assert read_streams([bag], [IMU], progress=False).streams["/imu"].values.shape == (10, 2)
    with sqlite3.connect(storage_file(bag)) as db:
        db.execute("DELETE FROM message_definitions WHERE topic_type = ?", ("my_pkg/msg/Gauge",))
    refused([bag], "does not define message type(s) my_pkg/msg/Gauge",
            "--msg-path <folder with my_pkg/msg/Gauge.msg>",
            specs=[StreamSpec("/gauge", "my_pkg/msg/Gauge", ("value",))])


# --- ROS 1 and unknown files -----------------------------------------------------------------------

def ros1_bag(path: Path) -> Path:
    with Ros1Writer(path) as w:
        conn = w.add_connection("/imu", IMU_TYPE, typestore=get_typestore(Stores.ROS1_NOETIC))
        for _, t, msg in imu_records():
            w.write(conn, t, TYPESTORE.cdr_to_ros1(TYPESTORE.serialize_cdr(msg, IMU_TYPE), IMU_TYPE))
    return path


def test_ros1_bags_truncated_or_unindexed(tmp_path):
    bag = ros1_bag(tmp_path / "whole.bag")
    assert len(read_streams([bag], [IMU], progress=False).streams["/imu"].stamps_ns) == 200
    whole = bag.read_bytes()
    cut = tmp_path / "cut.bag"
    cut.write_bytes(whole[: len(whole) // 2])
    refused([cut], "ROS 1 bag is truncated or damaged", "rosbag reindex")
    at = whole.index(b"index_pos=") + len(b"index_pos=")
    unindexed = tmp_path / "unindexed.bag"  # what a recording that did not finish leaves
    unindexed.write_bytes(whole[:at] + bytes(8) + whole[at + 8:])
    refused([unindexed], "ROS 1 bag has no index", "rosbag reindex")


def test_unknown_suffix_and_a_ros1_bag_among_ros2_bags(tmp_path):
    odd = tmp_path / "run.foo"
    odd.write_bytes(b"whatever")
    refused([odd], "unknown file suffix '.foo'", ".mcap and .db3 files")
    active = tmp_path / "run.bag.active"
    active.write_bytes(b"#ROSBAG V2.0\n")
    refused([active], "did not finish", "rosbag reindex")
    mixed = [write_bag(tmp_path / "b", imu_records()), ros1_bag(tmp_path / "r.bag")]
    refused(mixed, "ROS 1 bag (.bag) was given together with ROS 2 bags", "rosbags-convert")


def test_not_a_bag_at_all(tmp_path):
    fake = tmp_path / "fake.bag"
    fake.write_text("hello")
    refused([fake], "does not start as a ROS 1 bag does")


# --- explain on its own: errors hard to provoke with a real file -----------------------------------

@pytest.mark.parametrize("text, needles", [
    ("Chunk checksum mismatch.", ("MCAP file is truncated or damaged", "mcap recover")),
    ("Chunk size mismatch: expected 10 bytes, got 3.", ("MCAP file is truncated or damaged",)),
    ("Invalid MCAP footer.", ("MCAP file is truncated or damaged",)),
    ("Truncated record at offset 12: expected 40 bytes, got 2.", ("MCAP file is truncated or damaged",)),
    ("Unsupported chunk compression 'bz2'.", ("chunk compression 'bz2' is unsupported",)),
    ("Bag contains no type definitions. Instantiate AnyReader with a default_typestore argument.",
     ("carries no message definitions", "--msg-path")),
    ("Type 'my_pkg/msg/Gauge' is unknown.", ("definition of my_pkg/msg/Gauge", "--msg-path")),
    ("Bag encryption 'rosbag/AesCbcEncryptor' is not supported.", ("encrypted", "rosbag decrypt")),
    ("Could not deserialize 'sensor_msgs/msg/Imu': unpack requires a buffer", ("does not decode", "--msg-path")),
    ("something nobody foresaw", ("cannot read bag (ValueError: something nobody foresaw second line)", "truncated")),
])
def test_explain_names_causes_and_keeps_one_line(text, needles):
    exc = ValueError(text + "\nsecond line")
    line = explain(exc, [Path("/data/run1"), Path("/data/run2")])
    assert line.startswith("/data/run1, /data/run2: ") and "\n" not in line, line
    for needle in needles:
        assert needle in line, line


def test_explain_keyerror_for_a_type_but_not_for_other_keys():
    assert "definition of my_pkg/msg/Gauge" in explain(KeyError("my_pkg/msg/Gauge"), [Path("b")])
    assert "definition" not in explain(KeyError("stamp"), [Path("b")])


def test_explain_keeps_rosbags_text_short():
    line = explain(RuntimeError("x" * 5000), [Path("b")])
    assert len(line) < 400


# --- pose derivation: orientations it cannot use ---------------------------------------------------

def odometry(stamp_ns: int, position, orientation, linear) -> object:
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                      frame_id="odom")
    q = T["geometry_msgs/msg/Quaternion"](x=orientation[0], y=orientation[1], z=orientation[2], w=orientation[3])
    p = T["geometry_msgs/msg/Point"](x=position[0], y=position[1], z=position[2])
    v = T["geometry_msgs/msg/Vector3"](x=linear[0], y=linear[1], z=linear[2])
    twist = T["geometry_msgs/msg/Twist"](linear=v, angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0))
    return T[ODOM](header=header, child_frame_id="base_link",
                   pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=T["geometry_msgs/msg/Pose"](position=p,
                                                                                                   orientation=q),
                                                                  covariance=np.zeros(36)),
                   twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))


def odom_bag(path: Path, orientation=(0.0, 0.0, 0.0, 0.0), n: int = 50) -> Path:
    """Odometry moving along x at 1 m/s whose publisher filled only the twist and the position."""
    return write_bag(path, [("/odom", (1000 + 10 * k) * MS, odometry((1000 + 10 * k) * MS, (0.01 * k, 0.0, 0.0),
                                                                     orientation, (1.0, 0.0, 0.0)))
                            for k in range(n)])


def test_zero_odometry_orientation_is_refused_for_body_velocity_and_points_at_the_twist(tmp_path):
    bag = odom_bag(tmp_path / "odom")
    line = refused([bag], "/odom: 50 of 50 orientations are zero-norm or non-finite", "first at sample 0",
                   "twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z",
                   specs=[StreamSpec("/odom", ODOM, derive="body_velocity")])
    assert "Found zero norm" not in line
    world = read_streams([bag], [StreamSpec("/odom", ODOM, derive="world_velocity")], progress=False)
    np.testing.assert_allclose(world.streams["/odom"].values[5:-5], [[1.0, 0.0, 0.0]] * 40, atol=1e-6)
    twist = read_streams([bag], [StreamSpec("/odom", ODOM, tuple(f"twist.twist.linear.{a}" for a in "xyz"))],
                         progress=False)  # the hint works
    np.testing.assert_array_equal(twist.streams["/odom"].values[:, 0], 1.0)


def test_unnormalised_orientations_are_fine(tmp_path):
    bag = odom_bag(tmp_path / "odom", orientation=(0.0, 0.0, 2.0, 0.0))  # 180 degrees about z, norm 2
    data = read_streams([bag], [StreamSpec("/odom", ODOM, derive="body_velocity")], progress=False)
    np.testing.assert_allclose(data.streams["/odom"].values[5:-5], [[-1.0, 0.0, 0.0]] * 40, atol=1e-6)


def test_velocity_from_pose_counts_bad_orientations_and_positions():
    t = (1000 + 10 * np.arange(20)) * MS
    poses = np.zeros((20, 7))
    poses[:, 0] = 0.01 * np.arange(20)
    poses[:, 6] = 1.0
    poses[[3, 7], 3:7] = [[0.0, 0.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 1.0]]
    with pytest.raises(BagError, match=r"^/mocap: 2 of 20 orientations .*first at sample 3\).*world_velocity") as info:
        velocity_from_pose(t, poses, "body_velocity", where="/mocap", msgtype="geometry_msgs/msg/PoseStamped")
    assert "twist" not in str(info.value)
    np.testing.assert_allclose(velocity_from_pose(t, poses, "world_velocity")[5:-5, 0], 1.0, atol=1e-9)
    poses[[4, 5, 6], 1] = np.inf
    with pytest.raises(BagError, match=r"^/mocap: 3 of 20 positions are non-finite \(first at sample 4\)"):
        velocity_from_pose(t, poses, "world_velocity", where="/mocap")


def test_pose_stamped_with_zero_orientation(tmp_path):
    bag = write_bag(tmp_path / "p", [("/pose", (1000 + 10 * k) * MS, pose((1000 + 10 * k) * MS, (0.01 * k, 0, 0),
                                                                          (0.0, 0.0, 0.0, 0.0)))
                                     for k in range(20)])
    refused([bag], "/pose: 20 of 20 orientations", "derive world_velocity",
            specs=[StreamSpec("/pose", "geometry_msgs/msg/PoseStamped", derive="body_velocity")])


# --- through hiss-train: exit status 2 and one line ------------------------------------------------

def cli_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("hiss-train: error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train_config(folder: Path, outputs: list) -> Path:
    cfg = yaml.safe_load(open("config/train.yaml"))
    cfg["inputs"] = [{"topic": "/imu", "type": IMU_TYPE, "fields": list(IMU.fields)}]
    cfg["outputs"] = outputs
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                    "high": {"kind": "s4d", "d_model": 8, "n_layers": 1}}
    cfg["train"] = {"epochs": 1, "batch_size": 8, "seq_chunks": 8, "val_fraction": 0.25}
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, bag: Path, out: Path) -> int:
    return train_main(["--config", str(config), "--bag", str(bag), "--out", str(out), "--quiet",
                       "--cache-dir", str(out.parent / "cache")])


def test_hiss_train_exits_2_with_one_line(tmp_path, capsys):
    bag = write_bag(tmp_path / "b", imu_records())
    (bag / "metadata.yaml").unlink()
    config = train_config(tmp_path, [{"topic": "/odom", "type": ODOM, "derive": "body_velocity"}])
    assert train(config, bag, tmp_path / "run1") == 2
    cli_error(capsys, str(bag), "no metadata.yaml", "ros2 bag reindex")
    assert not (tmp_path / "run1").exists()

    recs = imu_records(400) + [("/odom", (1000 + 10 * k) * MS, odometry((1000 + 10 * k) * MS, (0.01 * k, 0.0, 0.0),
                                                                       (0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0)))
                               for k in range(200)]
    odom = write_bag(tmp_path / "odom", recs)
    assert train(config, odom, tmp_path / "run2") == 2
    cli_error(capsys, "/odom: 200 of 200 orientations are zero-norm", "twist.twist.linear.x")
