"""The estimator's intake over real DDS (``hiss_ros.nodes.intake``): paced, every message reaches
``process`` once, in arrival order across inputs, with its receipt time; without what pacing needs
from rclpy, callbacks instead, said once."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import ROS_ENV, Listener
from rclpy.qos import QoSProfile, ReliabilityPolicy

from hiss_ros.nodes.intake import CallbackIntake, PacedIntake, make_intake
from hiss_ros.pipeline import Pipeline, PipelineConfig

N = 60


@pytest.fixture()
def ros(monkeypatch):
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    listener = Listener("intake_test")
    yield listener
    listener.close()


def intake(ros, mode, taken):
    from sensor_msgs.msg import Imu
    from std_msgs.msg import Float32MultiArray

    def process(i, data, steady):
        taken.append((i, data, steady))
        return None

    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    lost = [0, 0]
    made = make_intake(mode, ros.node, ["intake_test/imu", "intake_test/other"], [Imu, Float32MultiArray], qos, lost,
                       process, Pipeline(PipelineConfig((6, 2), 400, 40)), 1000.0, lambda i, data: None)
    return made, lost


def publish_both(ros, made):
    """N IMU messages, every fifth followed by a message on the other input; (input, k) of each as published."""
    from sensor_msgs.msg import Imu
    from std_msgs.msg import Float32MultiArray

    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    pubs = [ros.node.create_publisher(t, f"intake_test/{n}", qos)
            for t, n in ((Imu, "imu"), (Float32MultiArray, "other"))]
    # both sides matched (discovery is per side; a volatile topic keeps nothing for a late joiner)
    assert ros.spin_until(lambda: all(p.get_subscription_count() > 0 for p in pubs) and made.publishers() == [1, 1], 30)
    order = []
    for k in range(N):
        msg = Imu()
        msg.header.stamp.nanosec = k
        pubs[0].publish(msg)
        order.append((0, k))
        if k % 5 == 4:
            other = Float32MultiArray(data=[float(k), 0.0])
            pubs[1].publish(other)
            order.append((1, k))
    return order


def decoded(i, data):
    """(input, k) of a message ``publish_both`` sent, from its bytes (CDR padding is not the same twice)."""
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Imu
    from std_msgs.msg import Float32MultiArray

    msg = deserialize_message(data, (Imu, Float32MultiArray)[i])
    return (i, msg.header.stamp.nanosec) if i == 0 else (i, int(msg.data[0]))


def test_paced_intake_hands_every_message_once_in_arrival_order(ros):
    taken = []
    made, lost = intake(ros, "paced", taken)
    try:
        assert isinstance(made, PacedIntake) and made.publishers() == [0, 0]
        began = time.monotonic_ns()
        order = publish_both(ros, made)
        # nothing is processed until the intake's timer takes it (no clock yet: it polls)
        assert ros.spin_until(lambda: len(taken) == len(order), 20), len(taken)
    finally:
        made.close()
    assert [decoded(i, data) for i, data, _ in taken] == order  # each once, as published (one publisher: as arrived)
    receipts = np.array([steady for *_, steady in taken])
    assert (np.diff(receipts) >= 0).all() and began <= receipts[0] and receipts[-1] <= time.monotonic_ns()
    assert made.batched == len(order) and lost == [0, 0]  # taken in batches, not one by one


def test_without_what_pacing_needs_it_takes_callbacks_and_says_so(ros, monkeypatch):
    from rclpy.impl.implementation_singleton import rclpy_implementation

    def unavailable(*_args, **_kwargs):
        raise TypeError("no WaitSet of this kind here")

    monkeypatch.setattr(rclpy_implementation, "WaitSet", unavailable)  # what only pacing uses (after its subscriptions)
    warnings = []
    monkeypatch.setattr(ros.node, "get_logger", lambda: type("L", (), {"warn": lambda _, m: warnings.append(m)})())
    taken = []
    made, _ = intake(ros, "paced", taken)
    monkeypatch.undo()
    try:
        assert isinstance(made, CallbackIntake) and len(warnings) == 1 and "intake:=callbacks" in warnings[0]
        order = publish_both(ros, made)
        assert ros.spin_until(lambda: len(taken) == len(order), 20), len(taken)
    finally:
        made.close()
    assert sorted(decoded(i, data) for i, data, _ in taken) == sorted(order)
    assert ros.node.count_publishers("intake_test/imu") == 1  # and the paced subscriptions made first are gone:
    assert ros.spin_until(lambda: ros.node.count_subscribers("intake_test/imu") == 0, 10)  # closed with the intake


@pytest.mark.parametrize("mode", ["paced", "callbacks"])
def test_a_callback_queued_before_close_is_ignored(ros, mode):
    """rclpy's EventsExecutor runs a timer or message event queued before its timer or subscription
    was destroyed (seen in CI: a deactivate then crashed the node on the intake's stale timer). After
    ``close`` such a call processes nothing and raises nothing."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Imu

    taken = []
    made, _ = intake(ros, mode, taken)
    made.close()
    if mode == "paced":
        made._on_timer()
    else:
        made._on_sample(0, serialize_message(Imu()))
    assert taken == []
