"""Exceptions raised by hiss_ros. Each message names the offending field, file or value."""


class HissError(Exception):
    """Base class of every error hiss_ros raises on purpose."""


class ConfigError(HissError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class ShapeError(HissError, ValueError):
    """A tensor given to a model does not have the shape the model was built for."""


class CheckpointError(HissError):
    """A checkpoint cannot be read, is of an unknown format version, or does not match its config."""


class BagError(HissError):
    """A bag cannot be read, or lacks a configured topic, or holds messages of another type."""
