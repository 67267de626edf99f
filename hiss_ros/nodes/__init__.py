"""ROS 2 adapters (these modules import rclpy; nothing below them does)."""
