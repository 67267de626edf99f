"""Helpers shared by the nodes."""

from __future__ import annotations

import gc
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from hiss_ros.data.streams import StreamSpec, canonical_type, check_fields, header_stamp_ns
from hiss_ros.errors import ConfigError, HissError


def freeze_heap() -> None:
    """Collect, then move every object alive now (torch, rclpy, the model: a few hundred thousand)
    out of the cyclic collector's reach, so its full collections, which otherwise come at random
    and scan them all (94 ms measured in the estimator on the benchmark machine), stay short.
    Call once set-up is done; objects freed later by reference counting still go at once.
    ``gc.unfreeze()`` before dropping a large cyclic structure (a hot-reloaded model)."""
    gc.collect()
    gc.freeze()


class Throttle:
    """Which of a node's repeated messages are due, per key (a topic's unreadable samples, a stale
    input): at most one per ``period_s``. rclpy's own throttled logging looks up its
    caller's source line on every call, printed or not: 0.25 ms a call on the benchmark machine,
    about 1 ms on a cold cache, so a node logging 1,000 bad samples a second through it would
    spend a quarter of a core on messages it does not print. This reads a clock first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.next: dict[object, float] = {}

    def due(self, key: object, period_s: float) -> bool:
        now = self.clock()
        if now < self.next.get(key, now):
            return False
        self.next[key] = now + period_s
        return True


def message_class(type_name: str) -> type:
    """'sensor_msgs/msg/Imu' (or 'sensor_msgs/Imu') -> the rclpy message class, from the installed
    interface package as rosidl's runtime lookup finds it; HissError naming the package to install
    (or the workspace to source) when it is missing."""
    package, _, name = canonical_type(type_name).split("/")
    try:
        module = importlib.import_module(f"{package}.msg")
    except ImportError:
        apt = "ros-jazzy-" + package.replace("_", "-")
        raise HissError(f"message type {type_name}: the interface package {package!r} is not installed here; "
                        f"install it (apt install {apt}) or build it in a workspace and source its "
                        "install/setup.bash before starting the node") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        known = sorted(n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n), type))
        raise HissError(f"message type {type_name}: package {package!r} has no message {name!r} "
                        f"(it has {', '.join(known[:12]) or 'none'}); rebuild it, or fix the type in the config")
    return cls


def input_class(spec: StreamSpec) -> type:
    """The message class of an input stream, checked against the stream: every field path names a
    field of the installed definition, and ``stamp: header`` has a header to read."""
    cls = message_class(spec.type)
    example = cls()
    try:
        check_fields(spec, example, values=False)
    except ConfigError as exc:
        raise HissError(f"{exc}, in the definition installed here: is its interface package the version "
                        "the model was trained with?") from None
    if spec.stamp == "header" and header_stamp_ns(example) is None:
        raise HissError(f"stream {spec.topic!r}: stamp = header, but the installed {spec.type} has no header")
    return cls


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


def spin(node: Node, executor: str = "events") -> None:
    """Spin ``node`` until the context shuts down (Ctrl-C, SIGTERM).

    ``events``: rclpy's EventsExecutor (a C++ event queue; at 1 kHz input it roughly halves the
    node's CPU against the default executor, see docs/BENCHMARKS.md). Its ``spin()`` does not
    return when a signal shuts the context down, so it is driven with ``spin_once``; rclpy
    builds without it fall back to ``single_threaded``, the default executor."""
    if executor == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            node.get_logger().warn("this rclpy has no EventsExecutor: using the single-threaded executor")
        else:
            events = EventsExecutor(context=node.context)
            events.add_node(node)
            while node.context.ok():
                events.spin_once(timeout_sec=0.1)
            return
    rclpy.spin(node)
