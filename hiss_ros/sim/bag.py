"""A simulation result as ROS 2 bag records, and the bag writer (mcap or sqlite3).

    write_sim_bag("run0", simulate(SimConfig(seed=0)), storage="mcap", zstd=True)

Topics (all from ``TOPICS``): IMU, header-less tactile array, optional per-taxel
MagneticField, and ground-truth wrench, twist and pose. Records are written in time order;
each message's receive time equals its sample time (no transport latency is simulated).
With ``zstd`` an mcap bag is compressed per chunk (small and fast), a sqlite3 bag per message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hiss_ros.data.write import float_array, imu, magnetic_field, pose, twist, wrench, write_bag
from hiss_ros.sim.endeffector import SimResult

TOPICS = {"imu": "/imu/data", "tactile": "/tactile", "wrench": "/wrench_gt", "twist": "/twist_gt",
          "pose": "/pose_gt"}
MAG_TOPIC = "/tactile/mag{}"  # one sensor_msgs/msg/MagneticField topic per taxel (frame taxel<i>)
TYPES = {"/imu/data": "sensor_msgs/msg/Imu", "/tactile": "std_msgs/msg/Float32MultiArray",
         "/wrench_gt": "geometry_msgs/msg/WrenchStamped", "/twist_gt": "geometry_msgs/msg/TwistStamped",
         "/pose_gt": "geometry_msgs/msg/PoseStamped"}
MAG_TYPE = "sensor_msgs/msg/MagneticField"
def topic_counts(res: SimResult, magnetic_field: bool = False) -> dict[str, int]:
    """Messages per topic that ``records`` yields."""
    counts = {TOPICS["imu"]: len(res.imu_ns), TOPICS["tactile"]: len(res.tactile_ns)}
    if magnetic_field:
        counts.update({MAG_TOPIC.format(i): len(res.tactile_ns) for i in range(res.config.taxels)})
    counts.update({TOPICS[k]: len(res.gt_ns) for k in ("wrench", "twist", "pose")})
    return counts


def records(res: SimResult, magnetic_field_topics: bool = False) -> Iterator[tuple[str, int, Any]]:
    """``(topic, receive_stamp_ns, message)`` in time order (ties: IMU, tactile, ground truth)."""
    streams = [res.imu_ns, res.tactile_ns, res.gt_ns]
    kind = np.concatenate([np.full(len(s), i, np.int8) for i, s in enumerate(streams)])
    stamps = np.concatenate(streams)
    order = np.lexsort((kind, stamps))
    index = np.concatenate([np.arange(len(s)) for s in streams])[order]
    mag_var = (res.config.noise_scale * res.config.tactile_noise_ut * 1e-6) ** 2
    taxels = res.tactile.reshape(len(res.tactile), -1, 3).astype(np.float64) * 1e-6  # (k, N, 3) tesla
    gyro, accel, tac = res.gyro.tolist(), res.accel.tolist(), res.tactile
    force, torque, pos, quat = res.force.tolist(), res.torque.tolist(), res.position.tolist(), res.orientation.tolist()
    lin, ang = res.linear_velocity.tolist(), res.angular_velocity.tolist()
    for kd, i, s in zip(kind[order].tolist(), index.tolist(), stamps[order].tolist(), strict=True):
        if kd == 0:
            yield TOPICS["imu"], s, imu(s, gyro[i], accel[i])
        elif kd == 1:
            yield TOPICS["tactile"], s, float_array(tac[i])
            if magnetic_field_topics:
                for t, b in enumerate(taxels[i]):
                    yield MAG_TOPIC.format(t), s, magnetic_field(s, b, f"taxel{t}", mag_var)
        else:
            yield TOPICS["wrench"], s, wrench(s, force[i], torque[i])
            yield TOPICS["twist"], s, twist(s, lin[i], ang[i])
            yield TOPICS["pose"], s, pose(s, pos[i], quat[i])


def write_sim_bag(path: str | Path, res: SimResult, storage: str = "mcap", zstd: bool = False,
                  magnetic_field_topics: bool = False, progress: bool = False) -> Path:
    """Write ``res`` as a new ROS 2 bag folder at ``path``; returns the path."""
    path = Path(path)
    total = sum(topic_counts(res, magnetic_field_topics).values())
    recs = tqdm(records(res, magnetic_field_topics), total=total, unit="msg", desc="writing bag",
                disable=not progress, leave=False)
    return write_bag(path, recs, storage=storage, zstd=zstd)
