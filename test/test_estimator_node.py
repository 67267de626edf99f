"""The estimator node over real DDS: every estimate arrives and equals the offline model's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROS_ENV
from test_train import config, contact_bag

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.data import read_streams
from hiss_ros.models import config_to_dict
from hiss_ros.pipeline import Normalization, Pipeline
from hiss_ros.train.cli import main as train_main
from hiss_ros.train.config import TrainConfig


def spin_until(executor, condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return condition()


@pytest.fixture(scope="module")
def imu_model(tmp_path_factory):
    """A small model trained on the IMU stream of a simulated contact bag (header stamps only,
    so live stamps equal the bag's)."""
    tmp = tmp_path_factory.mktemp("estimator")
    bag = contact_bag(tmp / "bag", seconds=20.0)
    cfg = yaml.safe_load(config(tmp, epochs=2).read_text())
    cfg["inputs"] = cfg["inputs"][:1]
    (tmp / "imu.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp / "imu.yaml"), "--bag", str(bag), "--out", str(tmp / "run"), "--quiet",
                       "--cache-dir", str(tmp / "cache")]) == 0
    return bag, tmp / "run" / "model.safetensors"


def offline_estimates(bag, model_path):
    """{stamp_ns: estimate} from the offline forward pass over the whole recording."""
    ckpt = load_checkpoint(model_path)
    cfg = TrainConfig.from_checkpoint(ckpt.data, config_to_dict(ckpt.config))
    streams = read_streams([bag], cfg.inputs, progress=False).streams
    norm = ckpt.normalization
    pipe = Pipeline(cfg.pipeline_config(tuple(ckpt.data["input_dims"])),
                    Normalization(np.asarray(norm["input_mean"]), np.asarray(norm["input_std"])))
    (ep,) = pipe.process([(streams[s.topic].stamps_ns, streams[s.topic].values) for s in cfg.inputs])
    with torch.no_grad():
        y = ckpt.model(torch.from_numpy(ep.x.reshape(1, -1, ep.x.shape[-1])))[0].numpy()
    y = y * np.asarray(norm["output_std"]) + np.asarray(norm["output_mean"])
    return dict(zip(ep.stamps_ns.tolist(), y, strict=True))


def test_live_estimates_equal_offline(imu_model, monkeypatch):
    bag, model_path = imu_model
    expected = offline_estimates(bag, model_path)
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    import rclpy
    from geometry_msgs.msg import WrenchStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosbags.highlevel import AnyReader
    from sensor_msgs.msg import Imu

    from hiss_ros.data.write import TYPESTORE

    proc = subprocess.Popen(
        [sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args", "-p", f"model_path:={model_path}",
         "-p", "num_threads:=1"],
        env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("estimator_test_driver", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    got: dict[int, np.ndarray] = {}

    def on_estimate(m):
        t = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        got[t] = np.array([m.wrench.force.x, m.wrench.force.y, m.wrench.force.z])

    node.create_subscription(WrenchStamped, "/hiss/wrench_gt", on_estimate, 1000)
    pub = node.create_publisher(Imu, "/imu/data", QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    try:
        assert spin_until(executor, lambda: pub.get_subscription_count() > 0, 60), "estimator never subscribed"
        with AnyReader([bag], default_typestore=TYPESTORE) as reader:
            conns = [c for c in reader.connections if c.topic == "/imu/data"]
            for n, (conn, _, raw) in enumerate(reader.messages(connections=conns), start=1):
                m = reader.deserialize(raw, conn.msgtype)
                msg = Imu()
                msg.header.stamp.sec, msg.header.stamp.nanosec = m.header.stamp.sec, m.header.stamp.nanosec
                for part in ("angular_velocity", "linear_acceleration"):
                    src, dst = getattr(m, part), getattr(msg, part)
                    dst.x, dst.y, dst.z = src.x, src.y, src.z
                pub.publish(msg)
                if n % 10 == 0:  # flow control: let the estimate of this chunk arrive first
                    assert spin_until(executor, lambda n=n: len(got) >= n // 10 - 1, 20), f"stalled at {len(got)}"
        assert spin_until(executor, lambda: len(got) >= len(expected), 20)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert sorted(got) == sorted(expected), f"{len(got)} estimates received, {len(expected)} expected\n{out[-2000:]}"
    diff = max(np.abs(got[t] - expected[t]).max() for t in expected)
    assert diff <= 1e-4, diff
