"""`ros2 run hiss_ros train`: the trainer as a node publishes its progress on /diagnostics."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import ROS_ENV
from test_train import config

from hiss_ros.data.synthetic import contact_bag


def test_trainer_node_reports_epochs_on_diagnostics(tmp_path, monkeypatch):
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    bag = contact_bag(tmp_path / "bag", seconds=40.0)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("diagnostics_listener", context=ctx)
    statuses = []
    node.create_subscription(DiagnosticArray, "/diagnostics",
                             lambda m: statuses.extend(s for s in m.status if s.name == "hiss_ros trainer"), 50)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiss_ros.nodes.trainer", "--config", str(config(tmp_path, epochs=12, patience=20)),
         "--bag", str(bag), "--out", str(tmp_path / "run"), "--quiet", "--cache-dir", str(tmp_path / "cache"),
         "--ros-args", "-r", "__node:=trainer_under_test"],
        env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    def finished() -> bool:
        return any(s.message == "training finished" for s in statuses)

    try:
        deadline, exited_at = time.monotonic() + 180, None
        while not finished() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)  # waits on DDS, not a sleep
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 10:  # its last message had ample time to arrive
                    break
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert proc.returncode == 0, out[-3000:]
    # Discovery takes a moment: the first epochs may go out before the listener is matched, so
    # the run is long enough (12 epochs) for later ones to arrive.
    epochs = [s for s in statuses if s.message.startswith("epoch")]
    assert epochs, f"no progress received; got {[s.message for s in statuses]}"
    values = {kv.key: kv.value for kv in epochs[-1].values}
    assert {"epoch", "epochs", "train_loss", "val_mse", "best_val_mse", "eta_s"} <= set(values)
    assert values["epochs"] == "12"
    assert statuses[-1].message == "training finished"
