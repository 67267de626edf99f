"""The replay node publishes a bag's messages, in order, with /clock for sim time."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from conftest import ROS_ENV, Listener

from hiss_ros.data.write import float_array, imu, write_bag

MS = 1_000_000


def test_replay_publishes_every_message_with_clock(tmp_path, monkeypatch):
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Imu
    from std_msgs.msg import Float32MultiArray

    recs = []
    for k in range(100):
        t = 5_000 * MS + k * 5 * MS
        recs.append(("/replay_test/imu", t, imu(t - MS, (k, 0, 0), (0, 0, 9.81))))
        if k % 5 == 0:
            recs.append(("/replay_test/tactile", t, float_array([k, -k])))
    bag = write_bag(tmp_path / "bag", recs)

    ros = Listener("replay_listener")
    imu_x, tactile, clock = [], [], []
    ros.node.create_subscription(Imu, "/replay_test/imu", lambda m: imu_x.append(
        (m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, m.angular_velocity.x)), 200)
    ros.node.create_subscription(Float32MultiArray, "/replay_test/tactile", lambda m: tactile.append(list(m.data)),
                                 200)
    ros.node.create_subscription(Clock, "/clock",
                                 lambda m: clock.append(m.clock.sec * 1_000_000_000 + m.clock.nanosec), 200)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiss_ros.nodes.replay", str(bag), "--rate", "5", "--clock",
         "--wait-for-subscribers", "30"],
        env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        last = 5_000 * MS + 99 * 5 * MS  # /clock keeps only the latest few: wait for the final time
        ros.spin_until(lambda: len(imu_x) >= 100 and clock and clock[-1] == last, 60)
        out = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
        ros.close()
    assert proc.returncode == 0, out
    assert [x for _, x in imu_x] == list(range(100)), out
    assert [t for t, _ in imu_x] == [5_000 * MS + k * 5 * MS - MS for k in range(100)]
    assert tactile == [[k, -k] for k in range(0, 100, 5)]
    assert np.all(np.diff(clock) >= 0) and clock[-1] == last
