"""Writing ROS 2 bags with rosbags: message builders and a writer for (topic, stamp, message).

    records = [("/imu/data", t, imu(t, gyro, accel)), ("/tactile", t, float_array(values))]
    write_bag("out.mcap", records)            # or "out_db3" with storage="sqlite3"

Used by tests (tiny bags in tmp_path, no binary fixtures) and by the importers and simulator.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from hiss_ros.cli_common import temp_folder_beside
from hiss_ros.errors import HissError

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
_T = TYPESTORE.types


def _header(stamp_ns: int, frame_id: str) -> Any:
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return _T["std_msgs/msg/Header"](stamp=_T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                     frame_id=frame_id)


def _vec(v: Sequence[float]) -> Any:
    return _T["geometry_msgs/msg/Vector3"](x=float(v[0]), y=float(v[1]), z=float(v[2]))


def imu(stamp_ns: int, gyro: Sequence[float], accel: Sequence[float], frame_id: str = "imu",
        orientation: Sequence[float] | None = None) -> Any:
    """sensor_msgs/msg/Imu; orientation as (x, y, z, w), or None for a sensor without an
    orientation estimate (REP 145: orientation_covariance[0] = -1)."""
    xyzw = (0.0, 0.0, 0.0, 1.0) if orientation is None else orientation
    q = _T["geometry_msgs/msg/Quaternion"](x=xyzw[0], y=xyzw[1], z=xyzw[2], w=xyzw[3])
    cov = np.zeros(9)
    orientation_cov = cov.copy()
    if orientation is None:
        orientation_cov[0] = -1.0
    return _T["sensor_msgs/msg/Imu"](
        header=_header(stamp_ns, frame_id), orientation=q, orientation_covariance=orientation_cov,
        angular_velocity=_vec(gyro), angular_velocity_covariance=cov,
        linear_acceleration=_vec(accel), linear_acceleration_covariance=cov,
    )


def magnetic_field(stamp_ns: int, field_tesla: Sequence[float], frame_id: str, variance: float = 0.0) -> Any:
    """sensor_msgs/msg/MagneticField (tesla); ``variance`` [T^2] on the covariance diagonal (0: unknown)."""
    return _T["sensor_msgs/msg/MagneticField"](header=_header(stamp_ns, frame_id), magnetic_field=_vec(field_tesla),
                                               magnetic_field_covariance=np.eye(3).ravel() * variance)


def float_array(values: Sequence[float]) -> Any:
    """std_msgs/msg/Float32MultiArray (no header: stamped with the bag's receive time)."""
    layout = _T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return _T["std_msgs/msg/Float32MultiArray"](layout=layout, data=np.asarray(values, dtype=np.float32))


def joint_state(stamp_ns: int, position: Sequence[float], frame_id: str = "") -> Any:
    """sensor_msgs/msg/JointState with only ``position`` filled: a stamped float array."""
    return _T["sensor_msgs/msg/JointState"](header=_header(stamp_ns, frame_id), name=[],
                                            position=np.asarray(position, dtype=np.float64),
                                            velocity=np.zeros(0), effort=np.zeros(0))


def wrench(stamp_ns: int, force: Sequence[float], torque: Sequence[float], frame_id: str = "tool") -> Any:
    w = _T["geometry_msgs/msg/Wrench"](force=_vec(force), torque=_vec(torque))
    return _T["geometry_msgs/msg/WrenchStamped"](header=_header(stamp_ns, frame_id), wrench=w)


def twist(stamp_ns: int, linear: Sequence[float], angular: Sequence[float], frame_id: str = "tool") -> Any:
    t = _T["geometry_msgs/msg/Twist"](linear=_vec(linear), angular=_vec(angular))
    return _T["geometry_msgs/msg/TwistStamped"](header=_header(stamp_ns, frame_id), twist=t)


def write_bag(path: str | Path, records: Iterable[tuple[str, int, Any]], storage: str = "mcap",
              zstd: bool = False, typestore: Any = TYPESTORE) -> Path:
    """Write ``(topic, receive_stamp_ns, message)`` records (any order of topics) to a new ROS 2
    bag folder; ``zstd`` compresses an mcap bag per chunk (the storage's own compression: small
    and fast), a sqlite3 bag per message. ``typestore``: one that knows the messages' types (a
    custom type's too); the bag carries their definitions."""
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    path = Path(path)
    conns: dict[str, Any] = {}
    writer = Writer(path, version=9, storage_plugin=plugin)
    if zstd:
        mode = CompressionMode.STORAGE if storage == "mcap" else CompressionMode.MESSAGE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    with writer:
        for topic, stamp_ns, msg in records:
            msgtype = msg.__msgtype__
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=typestore)
            writer.write(conns[topic], int(stamp_ns), typestore.serialize_cdr(msg, msgtype))
    return path


def pose(stamp_ns: int, position: Sequence[float], orientation: Sequence[float], frame_id: str = "world") -> Any:
    """geometry_msgs/msg/PoseStamped; orientation as (x, y, z, w)."""
    q = _T["geometry_msgs/msg/Quaternion"](x=orientation[0], y=orientation[1], z=orientation[2], w=orientation[3])
    p = _T["geometry_msgs/msg/Point"](x=float(position[0]), y=float(position[1]), z=float(position[2]))
    return _T["geometry_msgs/msg/PoseStamped"](header=_header(stamp_ns, frame_id),
                                               pose=_T["geometry_msgs/msg/Pose"](position=p, orientation=q))


BAG_FILES = ("metadata.yaml", "ATTRIBUTION.md")  # what a bag folder of ours holds, besides ...
BAG_SUFFIXES = (".mcap", ".db3", ".db3-shm", ".db3-wal", ".zstd")  # ... its storage files
SINGLE_FILE_BAGS = (".mcap", ".db3")  # a bag given as one file


def _is_bag_file(f: Path) -> bool:
    return f.is_file() and not f.is_symlink() and (f.name in BAG_FILES or f.name.endswith(BAG_SUFFIXES))


def replace_bag(path: Path, force: bool, delete: bool = True) -> None:
    """Make way for a new bag at ``path``. Nothing there: nothing to do. Something there: refused
    (``HissError``) unless ``force``; with it, a bag (a folder of bag files, or one .mcap / .db3
    file) is deleted, and anything else is refused even so. ``delete=False`` checks without deleting
    (to refuse before writing the first of several bags)."""
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise HissError(f"{path} already exists; pass --force to replace it")
    if _is_bag_file(path) and path.name.endswith(SINGLE_FILE_BAGS):
        if delete:
            path.unlink()
        return
    if not path.is_dir() or path.is_symlink():
        raise HissError(f"{path} exists and is not a bag; not deleting it even with --force")
    foreign = sorted(f.name for f in path.iterdir() if not _is_bag_file(f))
    if foreign:
        raise HissError(f"{path} exists and holds more than a bag ({', '.join(foreign[:5])}); "
                        "not deleting it even with --force")
    if delete:
        shutil.rmtree(path)


@contextmanager
def staged_bag(path: Path, force: bool) -> Iterator[Path]:
    """Where to write a new bag that will replace ``path``: a path in a temporary folder beside
    it (same file system), moved to ``path`` only once the block completes. A failure (disk full,
    Ctrl-C) deletes the temporary folder, so ``path`` never holds half a bag, and an old bag
    there survives a failed ``--force`` run. ``replace_bag``'s rules apply, checked up front."""
    replace_bag(path, force, delete=False)
    tmp = temp_folder_beside(path)
    try:
        yield tmp / path.name  # the bag's own name: rosbags names the storage file after its folder
        replace_bag(path, force)
        (tmp / path.name).rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
