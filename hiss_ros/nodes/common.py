"""Helpers shared by the nodes."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

DEFAULT_MODEL = "contact.safetensors"


def default_model_path() -> Path:
    """The shipped ``contact`` model: in the package share of a colcon/pip install, or in the
    source tree's ``models/`` for an editable (development) install."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.append(Path(get_package_share_directory("hiss_ros")) / "models")
        except PackageNotFoundError:
            pass
    except ImportError:  # the PyPI ROS wheels may come without ament_index_python
        pass
    candidates += [Path(sys.prefix) / "share/hiss_ros/models", Path(__file__).resolve().parents[2] / "models"]
    for folder in candidates:
        if (folder / DEFAULT_MODEL).is_file():
            return folder / DEFAULT_MODEL
    return candidates[-1] / DEFAULT_MODEL  # missing: loading it names this path


def message_class(type_name: str) -> type:
    """'sensor_msgs/msg/Imu' -> the rclpy message class."""
    package, _, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


@contextmanager
def running(node: Node) -> Iterator[Node]:
    """Run the body with ``node``; Ctrl-C and SIGTERM end it quietly and the node is destroyed.

    SIGTERM (what launch sends) shuts the context down from a signal handler: it surfaces as
    ExternalShutdownException, or, when it races the executor or a publish, as an RCL error
    about an invalid context. Errors while the context is still valid are real and propagate."""
    try:
        yield node
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
