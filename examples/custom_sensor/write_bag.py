"""Write a bag of the custom tactile pad (my_tactile_msgs/msg/TactileArray), an IMU and a
ground-truth wrench, as a robot with this pad would record it: ``python write_bag.py OUT``.

The pad's driver leaves header stamps at zero (common); the bag (mcap) carries the pad's message
definition, so training needs nothing but the bag. A stand-in for ``ros2 bag record -s mcap
/imu/data /pad /wrench_gt`` on a real robot, to try the whole path without one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hiss_ros.data.types import typestore
from hiss_ros.data.write import imu, wrench, write_bag

HERE = Path(__file__).resolve().parent
PAD = "my_tactile_msgs/msg/TactileArray"
MS = 1_000_000


def pad_message(store, pressure, total_force):
    """A TactileArray with its header stamp left at zero, as the driver sends it."""
    T = store.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="pad")
    force = T["geometry_msgs/msg/Vector3"](x=float(total_force[0]), y=float(total_force[1]), z=float(total_force[2]))
    return T[PAD](header=header, pressure=np.asarray(pressure, dtype=np.float32), total_force=force)


def recording(seconds: float = 60.0, seed: int = 0) -> list:
    """(topic, receive time, message): IMU 200 Hz, pad 50 Hz (8 taxels), wrench 100 Hz. The
    contact force builds up with pressing and decays (it needs memory across chunks)."""
    store = typestore([HERE])
    rng = np.random.default_rng(seed)
    n = int(seconds * 200)
    t = np.arange(n) / 200
    press = np.clip(np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6)), 0, None)
    accel = np.stack([np.sin(2 * np.pi * f * t + p) for f, p in rng.uniform([0.2, 0], [1.2, 6], (3, 2))], 1)
    force = np.zeros((n, 3))
    for i in range(1, n):
        force[i] = 0.97 * force[i - 1] + 0.03 * np.array([2 * accel[i, 0], 2 * accel[i, 1], 10 * press[i]])
    taxel_gain = np.linspace(1.0, 0.3, 8)
    recs = []
    for i in range(n):
        stamp = 1_000 * MS + i * 5 * MS
        recs.append(("/imu/data", stamp, imu(stamp, 0.05 * rng.standard_normal(3), accel[i] + (0, 0, 9.81))))
        if i % 4 == 0:
            pressure = press[i] * taxel_gain + 0.01 * rng.standard_normal(8)
            recs.append(("/pad", stamp + 3 * MS, pad_message(store, pressure, (0, 0, pressure.sum()))))
        if i % 2 == 0:
            recs.append(("/wrench_gt", stamp + MS, wrench(stamp, force[i], (0, 0, 0))))
    return recs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python write_bag.py OUT_BAG_FOLDER", file=sys.stderr)
        return 2
    bag = write_bag(args[0], recording(), typestore=typestore([HERE]))
    print(f"wrote {bag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
