"""Helpers shared by the nodes."""

from __future__ import annotations

import importlib


def message_class(type_name: str) -> type:
    """'sensor_msgs/msg/Imu' -> the rclpy message class."""
    package, _, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)
