"""Streaming sequence models: HiSS and flat baselines over S4D, Mamba, LSTM and Transformer layers.

    from hiss_ros.models import build_model
    model = build_model({"kind": "hiss", "input_dim": 6, "output_dim": 3, "chunk": 10,
                         "low": {"kind": "s4d", "d_model": 64, "n_layers": 2},
                         "high": {"kind": "mamba", "d_model": 32, "n_layers": 2}})
    runner = StepRunner(model.eval())   # serving: model.step_chunk's contract, fast (or compiled)
"""

from __future__ import annotations

from typing import Any

from hiss_ros.models.blocks import MIXERS, Stack
from hiss_ros.models.config import (
    FlatConfig,
    HiSSConfig,
    ModelConfig,
    StackConfig,
    config_to_dict,
    model_config_from_dict,
)
from hiss_ros.models.hiss import ChunkedModel, Flat, HiSS, StreamState
from hiss_ros.models.mamba import cuda_kernels_available
from hiss_ros.models.runner import STEP_BACKENDS, StepRunner

# Registry: model kind -> class. Each takes its config dataclass. Layer kinds: MIXERS.
MODELS: dict[str, type[ChunkedModel]] = {"hiss": HiSS, "flat": Flat}
LAYER_KINDS = tuple(MIXERS)
# What hiss-train --model / --compare accept: the HiSS of the config, or a flat stack of any layer kind.
MODEL_CHOICES = ("hiss", *(f"flat-{kind}" for kind in LAYER_KINDS))


def build_model(config: ModelConfig | dict[str, Any]) -> ChunkedModel:
    """Model from a config dataclass or the equivalent dict (validated; errors name the field)."""
    cfg = model_config_from_dict(config)
    return MODELS[cfg.kind](cfg)


__all__ = [
    "LAYER_KINDS",
    "MIXERS",
    "MODELS",
    "MODEL_CHOICES",
    "STEP_BACKENDS",
    "ChunkedModel",
    "Flat",
    "FlatConfig",
    "HiSS",
    "HiSSConfig",
    "ModelConfig",
    "Stack",
    "StackConfig",
    "StepRunner",
    "StreamState",
    "build_model",
    "config_to_dict",
    "cuda_kernels_available",
    "model_config_from_dict",
]
