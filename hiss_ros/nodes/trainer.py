"""``ros2 run hiss_ros train ...``: hiss-train as a ROS 2 node that reports its progress.

Same arguments as ``hiss-train``. After each epoch it publishes a
``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` (status name "hiss_ros trainer": epoch,
losses, best validation MSE, elapsed and estimated remaining time), so a running system (e.g.
rqt_runtime_monitor) can watch training; a final status says whether it succeeded.
"""

from __future__ import annotations

import sys

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.utilities import remove_ros_args

from hiss_ros.train.cli import main as train_main

STATUS_NAME = "hiss_ros trainer"


class TrainerNode(Node):
    def __init__(self) -> None:
        super().__init__("hiss_trainer")
        self._pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

    def publish(self, level: bytes, message: str, values: dict[str, object]) -> None:
        status = DiagnosticStatus(level=level, name=STATUS_NAME, message=message, hardware_id="hiss_ros")
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._pub.publish(msg)

    def flush(self, timeout_s: float = 2.0) -> None:
        """Give reliable subscribers the chance to receive the last status before we exit."""
        self._pub.wait_for_all_acked(Duration(seconds=timeout_s))

    def on_epoch(self, m: dict) -> None:
        eta = m["seconds"] / m["epoch"] * (m["epochs"] - m["epoch"])
        self.publish(DiagnosticStatus.OK, f"epoch {m['epoch']}/{m['epochs']}, val_mse {m['val_mse']:.4f}",
                     {**{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in m.items()}, "eta_s": f"{eta:.0f}"})


def main(args: list[str] | None = None) -> int:
    argv = sys.argv if args is None else args
    rclpy.init(args=argv)
    node = TrainerNode()
    try:
        code = train_main(remove_ros_args(argv)[1:], on_epoch=node.on_epoch)
        node.publish(DiagnosticStatus.OK if code == 0 else DiagnosticStatus.ERROR,
                     "training finished" if code == 0 else "training failed (see the log)", {"exit_code": code})
        node.flush()
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
