"""A ready-made hiss-train config for bags written by hiss-sim (default topics and rates).

    hiss_ros.sim.train_config.TRAIN_YAML        # the YAML text (save it as sim_train.yaml)
    train_config_dict()                        # the same, parsed

Inputs: IMU (6 channels, 400 Hz: the input clock) and the 15-channel tactile array; outputs:
the contact wrench (force and torque, tool frame) and the body twist. 400 Hz / 40 Hz = chunks
of 10 IMU samples.
"""

from __future__ import annotations

from typing import Any

import yaml

TRAIN_YAML = """\
# Training config for bags from hiss-sim (default topics and rates).
inputs:
  - {topic: /imu/data, type: sensor_msgs/msg/Imu,
     fields: [angular_velocity.x, angular_velocity.y, angular_velocity.z,
              linear_acceleration.x, linear_acceleration.y, linear_acceleration.z]}
  - {topic: /tactile, type: std_msgs/msg/Float32MultiArray, fields: [data], rate_hz: 100}  # held between samples
outputs:
  - {topic: /wrench_gt, type: geometry_msgs/msg/WrenchStamped,
     fields: [wrench.force.x, wrench.force.y, wrench.force.z,
              wrench.torque.x, wrench.torque.y, wrench.torque.z]}
  - {topic: /twist_gt, type: geometry_msgs/msg/TwistStamped,
     fields: [twist.linear.x, twist.linear.y, twist.linear.z,
              twist.angular.x, twist.angular.y, twist.angular.z]}
input_rate_hz: 400        # the IMU drives the input clock
output_rate_hz: 40        # one estimate per chunk of 10 IMU samples
max_gap_s: 0.5
filter: null
model: {kind: hiss, low: {kind: s4d, d_model: 64, n_layers: 2}, high: {kind: mamba, d_model: 64, n_layers: 2}}
train: {epochs: 50, batch_size: 16, lr: 5.52e-3, weight_decay: 0.0328, seq_chunks: 64, val_fraction: 0.2, seed: 0,
       patience: 10}
"""


def train_config_dict() -> dict[str, Any]:
    """``TRAIN_YAML`` parsed (a fresh dict each call)."""
    return yaml.safe_load(TRAIN_YAML)
