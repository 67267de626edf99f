"""Model configuration as validated dataclasses.

A config is plain data: ``to_dict`` gives JSON-ready dicts (stored in checkpoints) and
``model_config_from_dict`` turns such a dict back into a config, naming any bad field and value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hiss_ros.configfile import reject_unknown
from hiss_ros.errors import ConfigError


def layer_kinds() -> tuple[str, ...]:
    """The registered layer kinds (``hiss_ros.models.blocks.MIXERS``, the one registry)."""
    from hiss_ros.models.blocks import MIXERS  # blocks imports this module: resolved at call time

    return tuple(MIXERS)

POOLS = ("last", "mean")  # how HiSS reads a chunk feature from the low stack

# Per-kind default state size: S4D counts complex modes (N/2 of the paper's N=64 real),
# Mamba the state per inner channel (mamba_ssm's default 16). LSTM/Transformer have none.
_DEFAULT_D_STATE = {"s4d": 32, "mamba": 16}


def _require(ok: bool, where: str, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}.{name} = {value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    reject_unknown(data, cls, where, noun="field")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class StackConfig:
    """A stack of residual blocks of one layer kind.

    kind: a registered layer kind (``MIXERS``); d_model: block width; n_layers: number of blocks;
    dropout: applied to each block's output before the residual add.
    d_state: SSM state size (s4d: complex modes per channel; mamba: state per inner channel;
    0 means the kind's default). expand / d_conv: Mamba's inner expansion and conv width.
    n_heads / context: Transformer heads and attention window in samples (the streaming
    step keeps exactly this many past keys, so offline and streaming outputs agree).
    """

    kind: str
    d_model: int
    n_layers: int
    dropout: float = 0.1
    d_state: int = 0
    expand: int = 2
    d_conv: int = 4
    n_heads: int = 4
    context: int = 256

    def __post_init__(self) -> None:
        w = "layers"  # callers that know where the stack sits rename it (see _stack)
        _require(self.kind in layer_kinds(), w, "kind", self.kind, f"one of {list(layer_kinds())}")
        _require(_is_int(self.d_model) and self.d_model > 0, w, "d_model", self.d_model, "a positive int")
        _require(_is_int(self.n_layers) and self.n_layers > 0, w, "n_layers", self.n_layers, "a positive int")
        _require(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            w, "dropout", self.dropout, "a float in [0, 1)",
        )
        _require(_is_int(self.d_state) and self.d_state >= 0, w, "d_state", self.d_state, "an int >= 0")
        _require(_is_int(self.expand) and self.expand > 0, w, "expand", self.expand, "a positive int")
        _require(_is_int(self.d_conv) and self.d_conv > 0, w, "d_conv", self.d_conv, "a positive int")
        _require(_is_int(self.n_heads) and self.n_heads > 0, w, "n_heads", self.n_heads, "a positive int")
        _require(_is_int(self.context) and self.context > 0, w, "context", self.context, "a positive int")
        if self.kind == "transformer":
            _require(
                self.d_model % self.n_heads == 0, w, "d_model", self.d_model,
                f"a multiple of n_heads={self.n_heads}",
            )
        if self.d_state == 0 and self.kind in _DEFAULT_D_STATE:
            object.__setattr__(self, "d_state", _DEFAULT_D_STATE[self.kind])
        object.__setattr__(self, "dropout", float(self.dropout))


def _check_io(where: str, input_dim: Any, output_dim: Any, chunk: Any) -> None:
    _require(_is_int(input_dim) and input_dim > 0, where, "input_dim", input_dim, "a positive int")
    _require(_is_int(output_dim) and output_dim > 0, where, "output_dim", output_dim, "a positive int")
    _require(_is_int(chunk) and chunk > 0, where, "chunk", chunk, "a positive int")


def _check_variance(where: str, variance: Any) -> None:
    _require(isinstance(variance, bool), where, "variance", variance, "true or false")


def _check_deltas(where: str, deltas: Any, scale_deltas: Any) -> None:
    _require(isinstance(deltas, bool), where, "deltas", deltas, "true or false")
    _require(isinstance(scale_deltas, bool), where, "scale_deltas", scale_deltas, "true or false")
    _require(deltas or not scale_deltas, where, "scale_deltas", scale_deltas, "false when deltas is false")


@dataclass(frozen=True)
class HiSSConfig:
    """Hierarchical SSM: ``low`` runs over each chunk of ``chunk`` samples from zero state, its
    output at the chunk's last sample feeds ``high``, which runs over the chunk sequence; a linear
    head maps to ``output_dim``. ``deltas`` appends one-step input differences as channels;
    ``scale_deltas`` divides them by a per-channel scale fitted on the training data (a buffer,
    saved with the weights). ``pool``: the chunk feature is the low stack's output at the chunk's
    last sample (``last``) or its mean over the chunk (``mean``); either way it only uses samples
    up to the chunk's last one, the instant the estimate refers to. ``variance``: the head also
    predicts a per-channel log-variance, so the output is (B, K, 2*O) = [mean | log-variance]
    (``output_dim`` stays O; ``ChunkedModel.split_output`` separates them)."""

    input_dim: int
    output_dim: int
    chunk: int
    low: StackConfig
    high: StackConfig
    deltas: bool = True
    scale_deltas: bool = False
    pool: str = "last"
    variance: bool = False
    kind: str = field(default="hiss")

    def __post_init__(self) -> None:
        _check_io("hiss", self.input_dim, self.output_dim, self.chunk)
        _require(self.kind == "hiss", "hiss", "kind", self.kind, "'hiss'")
        _check_deltas("hiss", self.deltas, self.scale_deltas)
        _require(self.pool in POOLS, "hiss", "pool", self.pool, f"one of {list(POOLS)}")
        _check_variance("hiss", self.variance)
        object.__setattr__(self, "low", _stack("hiss.low", self.low))
        object.__setattr__(self, "high", _stack("hiss.high", self.high))


@dataclass(frozen=True)
class FlatConfig:
    """Flat baseline: one stack over every sample; output read at each chunk's last sample, the
    same instant a HiSS output refers to (no look-ahead)."""

    input_dim: int
    output_dim: int
    chunk: int
    layers: StackConfig
    deltas: bool = True
    scale_deltas: bool = False  # as HiSSConfig's
    variance: bool = False  # as HiSSConfig's
    kind: str = field(default="flat")

    def __post_init__(self) -> None:
        _check_io("flat", self.input_dim, self.output_dim, self.chunk)
        _require(self.kind == "flat", "flat", "kind", self.kind, "'flat'")
        _check_deltas("flat", self.deltas, self.scale_deltas)
        _check_variance("flat", self.variance)
        object.__setattr__(self, "layers", _stack("flat.layers", self.layers))


ModelConfig = HiSSConfig | FlatConfig
_MODEL_CONFIGS: dict[str, type] = {"hiss": HiSSConfig, "flat": FlatConfig}


def _stack(where: str, value: Any) -> StackConfig:
    try:
        return _from_dict(StackConfig, value, where)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(where + msg[len("layers"):] if msg.startswith("layers") else msg) from None


def model_config_from_dict(data: Any) -> ModelConfig:
    """Config from a dict such as ``{"kind": "hiss", "input_dim": 6, ...}`` (or a config itself)."""
    if isinstance(data, (HiSSConfig, FlatConfig)):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"model config: expected a mapping or config, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _MODEL_CONFIGS:
        raise ConfigError(f"model.kind = {kind!r}: expected one of {sorted(_MODEL_CONFIGS)}")
    return _from_dict(_MODEL_CONFIGS[kind], data, kind)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict that ``model_config_from_dict`` turns back into an equal config."""
    return dataclasses.asdict(config)
