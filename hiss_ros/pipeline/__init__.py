"""Streams -> aligned, filtered, normalised fixed-size chunks; shared by the trainer and the node."""

from hiss_ros.pipeline.core import Chunk, Episode, FilterConfig, Normalization, Pipeline, PipelineConfig
from hiss_ros.pipeline.strapdown import StrapdownConfig

__all__ = ["Chunk", "Episode", "FilterConfig", "Normalization", "Pipeline", "PipelineConfig", "StrapdownConfig"]
