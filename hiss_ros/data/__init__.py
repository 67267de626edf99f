"""Data in: stream specs, bag reading (rosbags), arrays out. Imports without ROS."""

from hiss_ros.data.bag import BagData, StreamData, StreamReport, read_streams
from hiss_ros.data.streams import SUPPORTED_TYPES, StreamSpec, message_stamp_ns, message_values

__all__ = ["SUPPORTED_TYPES", "BagData", "StreamData", "StreamReport", "StreamSpec", "message_stamp_ns",
           "message_values", "read_streams"]
