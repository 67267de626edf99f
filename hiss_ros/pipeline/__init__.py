"""Streams -> aligned, filtered, normalised fixed-size chunks; shared by the trainer and the node."""

from hiss_ros.pipeline.core import Chunk, Episode, FilterConfig, Normalization, Pipeline, PipelineConfig

__all__ = ["Chunk", "Episode", "FilterConfig", "Normalization", "Pipeline", "PipelineConfig"]
