"""Offline training from bags: config, dataset (through the shared pipeline), loop, CLI."""

from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.dataset import Dataset, load_dataset
from hiss_ros.train.loop import Result, train

__all__ = ["Dataset", "Result", "TrainConfig", "TrainSettings", "load_dataset", "train"]
