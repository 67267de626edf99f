"""Dataset importers (hiss-import): BROAD, EuRoC/ASL -> ROS 2 bags. See docs/DATASETS.md."""

from hiss_ros.importers.common import DatasetError

__all__ = ["DatasetError"]
