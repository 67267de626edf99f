"""hiss_ros: learned state estimation from raw robot sensors with Hierarchical State Space Models.

Everything in this package except ``hiss_ros.nodes`` imports without ROS (no rclpy).
"""

__version__ = "0.1.0"
