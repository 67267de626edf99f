"""``ros2 run hiss_ros replay BAG``: publish a ROS 2 bag's topics in real time (no ``ros2 bag`` needed).

    ros2 run hiss_ros replay run1.mcap [--rate 2.0] [--loop] [--clock] [--topics /imu/data /tactile]
                                       [--wait-for-subscribers 10]

Messages go out at their recorded receive times (scaled by ``--rate``), decoded and republished,
with each topic's recorded QoS reliability (best effort stays best effort). ``--clock`` also
publishes ``/clock`` with the bag time, for nodes run with ``use_sim_time``; ``--loop`` starts
over at the end (time then jumps back, which the estimator treats as a new episode).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rclpy.utilities import remove_ros_args
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosReliability
from rosgraph_msgs.msg import Clock

from hiss_ros.data.write import TYPESTORE
from hiss_ros.nodes.common import message_class, running


def _qos(conn) -> QoSProfile:
    profiles = getattr(conn.ext, "offered_qos_profiles", None) or []
    best_effort = any(getattr(p, "reliability", None) == QosReliability.BEST_EFFORT for p in profiles)
    return QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT if best_effort
                      else ReliabilityPolicy.RELIABLE)


class Replay(Node):
    def __init__(self, bag: Path, rate: float, clock: bool, topics: list[str] | None, wait_s: float = 0.0) -> None:
        super().__init__("hiss_replay")
        self.bag, self.rate, self.topics, self.wait_s = bag, rate, topics, wait_s
        self.clock = self.create_publisher(Clock, "/clock", 10) if clock else None
        self.publishers_: dict[str, tuple] = {}
        self.sent = 0

    def _wait_for_subscribers(self) -> None:
        """Hold the start until every topic has a subscriber (at most ``wait_s``), so a node
        started at the same time misses nothing."""
        deadline = time.monotonic() + self.wait_s
        pubs = [p for p, _ in self.publishers_.values()]
        while time.monotonic() < deadline and not all(p.get_subscription_count() > 0 for p in pubs):
            time.sleep(0.05)  # polling DDS discovery, which runs in its own threads
        waiting = [t for t, (p, _) in self.publishers_.items() if p.get_subscription_count() == 0]
        if waiting:
            self.get_logger().warn(f"starting without subscribers on {waiting}")
        self.wait_s = 0.0

    def play_once(self) -> None:
        with AnyReader([self.bag], default_typestore=TYPESTORE) as reader:
            conns = [c for c in reader.connections if self.topics is None or c.topic in self.topics]
            missing = set(self.topics or ()) - {c.topic for c in conns}
            if missing:
                raise SystemExit(f"replay: {sorted(missing)} not in {self.bag}; it has {sorted(reader.topics)}")
            for c in conns:
                if c.topic not in self.publishers_:
                    cls = message_class(c.msgtype)
                    self.publishers_[c.topic] = (self.create_publisher(cls, c.topic, _qos(c)), cls)
            if self.wait_s > 0:
                self._wait_for_subscribers()
            start_wall, start_bag = time.monotonic(), None
            for conn, t_ns, raw in reader.messages(connections=conns):
                start_bag = t_ns if start_bag is None else start_bag
                delay = start_wall + (t_ns - start_bag) / 1e9 / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the replay in real time
                if self.clock is not None:
                    msg = Clock()
                    msg.clock.sec, msg.clock.nanosec = divmod(t_ns, 1_000_000_000)
                    self.clock.publish(msg)
                pub, cls = self.publishers_[conn.topic]
                pub.publish(deserialize_message(bytes(raw), cls))  # ROS 2 bags hold CDR: no conversion
                self.sent += 1
                if not rclpy.ok():
                    return


def main(args: list[str] | None = None) -> int:
    argv = sys.argv if args is None else args
    p = argparse.ArgumentParser(prog="replay", description=__doc__.splitlines()[0])
    p.add_argument("bag", type=Path)
    p.add_argument("--rate", type=float, default=1.0, help="speed factor (2.0 = twice real time)")
    p.add_argument("--loop", action="store_true")
    p.add_argument("--clock", action="store_true", help="publish /clock with the bag time")
    p.add_argument("--topics", nargs="+", help="only these topics")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a subscriber on every topic before starting")
    opts = p.parse_args(remove_ros_args(argv)[1:])
    if opts.rate <= 0:
        p.error("--rate must be positive")
    rclpy.init(args=argv)
    node = Replay(opts.bag, opts.rate, opts.clock, opts.topics, opts.wait_for_subscribers)
    with running(node):
        while rclpy.ok():
            node.play_once()
            node.get_logger().info(f"replayed {node.sent} messages from {opts.bag}")
            if not opts.loop:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
