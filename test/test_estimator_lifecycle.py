"""The estimator node in this process (no DDS traffic needed: samples go straight to its
``_process`` as the intakes hand them over): hot reloads, lifecycle shutdown, and what a dropped
sample may not change."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import ROS_ENV
from rclpy.serialization import serialize_message
from safetensors import safe_open
from safetensors.torch import save_file

from hiss_ros.pipeline.core import DROP_REASONS
from hiss_ros.shipped import shipped_model

T0, PERIOD = 10_000_000_000, 2_500_000  # the contact model's IMU at 400 Hz, tactile at 100 Hz


@pytest.fixture()
def node(monkeypatch):
    """An estimator, configured and active (autostart), made by ``make(*parameters)``; normal
    scheduling unless ``realtime_priority`` is given (pytest's own threads are the node's here)."""
    import rclpy

    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    made = []

    def make(*params: str):
        args = ["hiss_estimator", "--ros-args", "-p", "diagnostics_period_s:=100.0", "-p", "realtime_priority:=0",
                "-p", "step_backend:=eager"]
        for p in params:
            args += ["-p", p]
        rclpy.init(args=args)
        from hiss_ros.nodes.estimator import Estimator

        made.append(Estimator())
        return made[-1]

    yield make
    for n in made:
        n.destroy_node()
    rclpy.try_shutdown()


def imu(stamp_ns: int, gyro=(0.0, 0.0, 0.0)) -> bytes:
    from sensor_msgs.msg import Imu

    m = Imu()
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    m.angular_velocity.x, m.angular_velocity.y, m.angular_velocity.z = (float(g) for g in gyro)
    m.linear_acceleration.z = 9.81
    return serialize_message(m)


def tactile(value: float = 0.0) -> bytes:
    from std_msgs.msg import Float32MultiArray

    return serialize_message(Float32MultiArray(data=[value] + [0.0] * 14))


def feed(node, n: int, start: int = 0) -> None:
    """``n`` IMU samples (and every fourth a tactile one) from sample ``start``, received now."""
    for k in range(start, start + n):
        now = time.monotonic_ns()
        if k % 4 == 0:
            node._process(1, tactile(), now)
        node._process(0, imu(T0 + k * PERIOD), now)


def without_novelty(tmp_path) -> str:
    """The shipped contact model as an older trainer wrote it: no novelty statistics."""
    with safe_open(str(shipped_model("contact")), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hiss_ros"])
    meta["data"].pop("novelty")
    path = tmp_path / "contact_old.safetensors"
    save_file(tensors, str(path), metadata={"hiss_ros": json.dumps(meta)})
    return str(path)


def test_a_hot_reload_judges_by_the_new_models_statistics_and_keeps_every_sample_counted(node, tmp_path):
    from rclpy.parameter import Parameter

    n = node(f"model_path:={without_novelty(tmp_path)}", "intake:=callbacks")
    feed(n, 200)
    n.diagnostics.report()
    assert n.diagnostics._novelty_warn is None
    steady = time.monotonic_ns()
    held = (0, imu(T0 + 200 * PERIOD), steady)
    assert not n.intake.deferral.offer(0, T0 + 200 * PERIOD, steady, held)  # held back: no chunk due
    assert n.set_parameters([Parameter("model_path", value="contact")])[0].successful
    assert n.diagnostics._novelty_warn == n.est.spec.novelty.warn  # the new model's, not the last one's
    feed(n, 200, start=201)
    n.diagnostics.report()  # its novelty scored and judged (it once formatted the last model's None: TypeError)
    assert len(n.diagnostics.novelty) > 0
    counters = n.est.counters
    received = sum(n.diagnostics.received)
    assert received == counters["accepted"] + sum(counters[r] for r in DROP_REASONS), (received, counters)


def test_a_refused_reload_leaves_no_publisher_behind(node):
    from rclpy.parameter import Parameter

    n = node("model_path:=contact")
    before = sorted(n._outputs)
    result = n.set_parameters([Parameter("model_path", value="contact_uncertainty")])[0]
    assert not result.successful and "would change type from" in result.reason, result.reason
    assert sorted(n._outputs) == before
    topics = {name for name, _ in n.get_publisher_names_and_types_by_node(n.get_name(), n.get_namespace())}
    assert not any(t.endswith("wrench_variance") for t in topics), topics


def test_shutdown_while_active_stops_estimating(node):
    n = node("model_path:=contact")
    feed(n, 100)
    assert n.est.counters["estimates"] > 0
    n.trigger_shutdown()
    assert n.intake is None and n.est is None and n._outputs == {}


def test_destroying_a_node_after_a_shutdown_with_samples_pending_is_quiet(node):
    """Ctrl-C / SIGTERM: the context goes down first, then ``running`` destroys the node. The samples
    the paced intake has not taken yet are dropped then: publishing their estimates would raise."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Imu
    from std_msgs.msg import Float32MultiArray

    BEST_EFFORT = ReliabilityPolicy.BEST_EFFORT
    n = node("model_path:=contact")
    feeder = rclpy.create_node("feeder")
    seen = []
    feeder.create_subscription(Imu, "/imu/data", seen.append, QoSProfile(depth=100, reliability=BEST_EFFORT))
    imu_pub, tactile_pub = (feeder.create_publisher(t, topic, qos_profile_sensor_data)
                            for t, topic in ((Imu, "/imu/data"), (Float32MultiArray, "/tactile")))
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(feeder)
    deadline = time.monotonic() + 30
    while (imu_pub.get_subscription_count() < 2 or tactile_pub.get_subscription_count() < 1) \
            and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    for k in range(40):  # 4 chunks' worth, never taken: the node is not spun
        msg = Imu()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(T0 + k * PERIOD, 1_000_000_000)
        imu_pub.publish(msg)
        if k % 4 == 0:
            tactile_pub.publish(Float32MultiArray(data=[0.0] * 15))
    while len(seen) < 40 and time.monotonic() < deadline:  # delivered in this process: to the node too
        executor.spin_once(timeout_sec=0.05)
    assert len(seen) == 40
    executor.shutdown()
    feeder.destroy_node()
    rclpy.shutdown()
    n.destroy_node()  # raised RCLError (publisher's context is invalid) when it processed them
    assert n.est.counters["estimates"] == 0


def test_destroying_an_active_node_leaves_nothing_of_it_running(node):
    """A node made in a larger program (here pytest's) raises the process's threads while active;
    destroyed, not deactivated first, it leaves them as they were, and no subscription behind (the
    paced intake's are its own, not the node's)."""
    import rclpy
    from test_estimator_node import thread_policies
    from test_realtime import fifo_permitted

    before = thread_policies(os.getpid())
    n = node("model_path:=contact", "realtime_priority:=3")
    assert n.priority.raised == fifo_permitted(), n.priority.status
    if n.priority.raised:
        assert thread_policies(os.getpid()) == {(os.SCHED_FIFO, 3)}
    probe = rclpy.create_node("probe")
    assert probe.count_subscribers("/imu/data") == 1
    n.destroy_node()
    assert thread_policies(os.getpid()) == before and not n.priority.raised
    assert probe.count_subscribers("/imu/data") == 0
    probe.destroy_node()


def test_reports_check_the_cpu_and_a_reload_compile_thread_stays_normal(node, monkeypatch):
    """The wiring of hiss_ros.nodes.realtime (made-up threads, whatever this machine permits): each
    diagnostics report runs the CPU check; a hot reload loads the new model at normal scheduling,
    and its compile thread is kept out of the raise."""
    import threading

    from rclpy.parameter import Parameter
    from test_realtime import FakeOS

    from hiss_ros.nodes import realtime

    me = threading.get_native_id()  # the executor's thread: here, pytest's
    fake = FakeOS(monkeypatch, [41, me])
    n = node("model_path:=contact", "realtime_priority:=4")
    assert n.priority.status == "SCHED_FIFO 4" and fake.policy == {41: (os.SCHED_FIFO, 4), me: (os.SCHED_FIFO, 4)}
    load, loaded_at = n._load, []

    def load_and_see(path: str):
        loaded_at.append(fake.policy[me])
        return load(path)

    monkeypatch.setattr(n, "_load", load_and_see)
    assert n.set_parameters([Parameter("model_path", value="contact")])[0].successful
    assert loaded_at == [(os.SCHED_OTHER, 0)] and fake.policy[me] == (os.SCHED_FIFO, 4)
    compiled, kept_normal = threading.Event(), []

    def compile_in_thread(est) -> str:
        kept_normal.append(threading.get_native_id() in realtime._RAISE.normal)
        compiled.set()
        return "in use"

    monkeypatch.setattr(n, "_compile", compile_in_thread)
    n._compile_in_background(n.est)
    assert compiled.wait(30) and kept_normal == [True]
    monkeypatch.setattr(realtime._RAISE, "cpu_share", lambda: 0.97)
    n.diagnostics.report()
    assert n.priority.status == "normal (SCHED_FIFO dropped: 97% of a core)"
    assert set(fake.policy.values()) == {(os.SCHED_OTHER, 0)}


def test_a_dropped_clock_sample_does_not_move_the_receipt_time_line(node):
    """Header-less samples are stamped on the clock stream's time line; a clock sample the pipeline
    drops (NaN, stamped 0.4 s ahead) must not move it, nor reach the pacer as a stamp."""
    n = node("model_path:=contact", "intake:=callbacks")
    feed(n, 100)
    offset = n._stamps.steady_offset
    assert offset is not None
    assert n._process(0, imu(T0 + 100 * PERIOD + 400_000_000, gyro=(np.nan, 0, 0)), time.monotonic_ns()) is None
    assert n.est.counters["nonfinite"] == 1 and n._stamps.steady_offset == offset


def test_graph_backend_on_the_cpu_fails_configure_saying_why(node):
    from hiss_ros.errors import HissError

    with pytest.raises(HissError) as failed:  # autostart: a node that cannot configure says why and stops
        node("step_backend:=graph", "device:=cpu")
    assert str(failed.value) == ("step_backend:=graph: step backend 'graph' needs the model on a CUDA device; "
                                 "this one is on cpu")
