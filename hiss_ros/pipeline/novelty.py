"""How unlike the training data a chunk of input is, for every estimate of every model.

A learned estimator's own variance (the variance head) knows the noise it was trained on, not what
it has never seen: an unseen motion, a frozen or saturated channel, a sensor swapped for another.
``Novelty`` gives each chunk a score from statistics the trainer fitted on its training chunks:
per input channel the chunk's mean and log standard deviation (2C features, normalised units;
``FLOOR`` keeps a frozen channel's log finite), their squared z-scores against the training
chunks averaged over the features, divided by the median of that average over the training
chunks. So a typical training chunk scores about 1; a chunk whose statistics are ``k`` training
standard deviations off in one feature of F scores about ``k^2 / F`` over that median more.

Used in two ways (both from the same stored statistics, in the node and in ``hiss-eval`` alike):
- ``/diagnostics`` reports the recent median score and warns when it stays above ``warn``, the
  score that 99.9 % of the training chunks stay below (an out-of-distribution input);
- with ``inflate`` (``train.novelty_inflation``, on by default for models with the variance head),
  the predicted variance of an estimate is multiplied by ``max(1, score)`` (at most
  ``MAX_INFLATION``): never lowered, raised in proportion to how much less typical than the
  median training chunk its input is. This is a
  heuristic for what the variance head cannot know (docs/UNCERTAINTY.md has what it does on
  held-out data); the post-hoc ``variance_scale`` is fitted with it applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiss_ros.errors import ConfigError

FLOOR = 1e-3  # added to a chunk's standard deviation (normalised units) before its log
MAX_INFLATION = 1e4  # the most the variance is raised (std x100): finite, whatever the input


def features(x: np.ndarray) -> np.ndarray:
    """Chunks x (..., chunk, C), normalised inputs -> (..., 2C): per channel the mean and
    log(std + FLOOR) over the chunk, in float64."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-2]
    mean = np.add.reduce(x, -2) / n  # x.mean(-2) and x.std(-2), bit for bit, at half the cost (every estimate)
    d = x - mean[..., None, :]
    return np.concatenate([mean, np.log(np.sqrt(np.add.reduce(d * d, -2) / n) + FLOOR)], -1)


@dataclass(frozen=True)
class Novelty:
    mean: np.ndarray  # (2C,) of the features over the training chunks
    std: np.ndarray  # (2C,) > 0
    reference: float  # median over the training chunks of the mean squared z-score (> 0)
    warn: float  # the score (relative to ``reference``) 99.9 % of the training chunks stay below
    inflate: bool = False  # multiply the predicted variance by max(1, score)

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            v = np.asarray(getattr(self, key), dtype=np.float64)
            if v.ndim != 1 or not v.size or v.size % 2 or not np.isfinite(v).all():
                raise ConfigError(f"novelty.{key}: expected an even number of finite numbers, got {v.size}")
            v.flags.writeable = False
            object.__setattr__(self, key, v)
        if self.mean.shape != self.std.shape or (self.std <= 0).any():
            raise ConfigError(f"novelty: mean and std must have the same length ({self.mean.size}, {self.std.size}) "
                              "and every std must be > 0")
        for key in ("reference", "warn"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"novelty.{key} = {v!r}: expected a positive number")
        if not isinstance(self.inflate, bool):
            raise ConfigError(f"novelty.inflate = {self.inflate!r}: expected true or false")

    @property
    def channels(self) -> int:
        return self.mean.size // 2

    @classmethod
    def fit(cls, chunks: list[np.ndarray], inflate: bool = False) -> Novelty:
        """From the training chunks, a list of (K, chunk, C) normalised inputs."""
        f = features(np.concatenate(chunks))
        mean, std = f.mean(0), f.std(0)
        std = np.maximum(std, FLOOR)  # a constant feature: any change of it is novel
        raw = (((f - mean) / std) ** 2).mean(1)
        reference = max(float(np.median(raw)), 1e-6)
        return cls(mean, std, reference, max(float(np.quantile(raw, 0.999)) / reference, 1.0), inflate)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Chunks x (..., chunk, C) -> (...) scores (1: a typical training chunk)."""
        z = (features(x) - self.mean) / self.std
        return np.add.reduce(z * z, -1) / z.shape[-1] / self.reference  # (z ** 2).mean(-1), bit for bit

    def inflation(self, x: np.ndarray) -> np.ndarray:
        """(...) factor on the predicted variance of the chunks x (``factor`` of their score)."""
        return self.factor(self.score(x))

    def factor(self, score: np.ndarray) -> np.ndarray:
        """The factor on the predicted variance for novelty scores ``score``: max(1, score) (at
        most ``MAX_INFLATION``) with ``inflate``, else 1."""
        return np.clip(score, 1.0, MAX_INFLATION) if self.inflate else np.ones_like(score)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "reference": self.reference, "warn": self.warn,
                "inflate": self.inflate}

    @classmethod
    def from_dict(cls, data: Any) -> Novelty:
        keys = {"mean", "std", "reference", "warn", "inflate"}
        if not isinstance(data, dict) or set(data) != keys:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"novelty: expected the keys {sorted(keys)}, got {got}")
        for key in ("mean", "std"):
            if not isinstance(data[key], list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in data[key]):
                raise ConfigError(f"novelty.{key}: expected a list of numbers")
        return cls(np.asarray(data["mean"]), np.asarray(data["std"]), data["reference"], data["warn"], data["inflate"])
