"""`ros2 run hiss_ros train`: the trainer as a node publishes its progress on /diagnostics."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROS_ENV, Listener
from test_train import config

from hiss_ros.data.synthetic import contact_bag


def test_trainer_node_reports_epochs_on_diagnostics(tmp_path, monkeypatch):
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    from diagnostic_msgs.msg import DiagnosticArray

    bag = contact_bag(tmp_path / "bag", seconds=40.0)
    ros = Listener("diagnostics_listener")
    statuses = []
    ros.node.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda m: statuses.extend(s for s in m.status if s.name == "hiss_ros trainer"), 50)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiss_ros.nodes.trainer", "--config", str(config(tmp_path, epochs=12, patience=20)),
         "--bag", str(bag), "--out", str(tmp_path / "run"), "--quiet", "--cache-dir", str(tmp_path / "cache"),
         "--ros-args", "-r", "__node:=trainer_under_test"],
        env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Until the final status arrives, or 10 s after the trainer exited without it.
        ros.spin_until(lambda: any(s.message == "training finished" for s in statuses) or proc.poll() is not None,
                       180)
        ros.spin_until(lambda: any(s.message == "training finished" for s in statuses), 10)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        ros.close()
    assert proc.returncode == 0, out[-3000:]
    # Discovery takes a moment: the first epochs may go out before the listener is matched, so
    # the run is long enough (12 epochs) for later ones to arrive.
    epochs = [s for s in statuses if s.message.startswith("epoch")]
    assert epochs, f"no progress received; got {[s.message for s in statuses]}"
    values = {kv.key: kv.value for kv in epochs[-1].values}
    assert {"epoch", "epochs", "train_loss", "val_mse", "best_val_mse", "eta_s"} <= set(values)
    assert values["epochs"] == "12"
    assert statuses[-1].message == "training finished"
