"""Helpers shared by the nodes."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node


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
