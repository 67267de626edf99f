"""Data in: stream specs, bag reading (rosbags), arrays out. Imports without ROS."""

from hiss_ros.data.bag import BagData, StreamData, StreamReport, read_streams
from hiss_ros.data.streams import StreamSpec, canonical_type, header_stamp_ns, message_values

__all__ = ["BagData", "StreamData", "StreamReport", "StreamSpec", "canonical_type", "header_stamp_ns",
           "message_values", "read_streams"]
