"""Chunked sequence-to-sequence models: HiSS and the flat baselines.

Shapes: B batch, L samples, K = L / chunk outputs, I input_dim, O output_dim, W output width:
O, or 2*O = [mean | log-variance] for a config with ``variance`` (``split_output`` separates them).

Streaming contract, shared by both:
    y = model(x)                                  x (B, L, I), L % chunk == 0 -> y (B, K, W)
    state = model.init_state(batch_size)
    y_k, state = model.step_chunk(x_k, state)     x_k (B, chunk, I) -> y_k (B, W) == y[:, k]
    mean, log_var = model.split_output(y)         (..., O) each; log_var None without ``variance``
Output k is the estimate at the time of chunk k's LAST sample and depends only on inputs
0 .. (k+1)*chunk - 1 (no look-ahead, unlike the reference code; see docs).

The modules hold the math only: ``step_chunk`` is the module path, the same in training and
inference. Serving steps through ``hiss_ros.models.runner.StepRunner`` (same contract, faster in
inference: the fast or the compiled step), which lives outside the module and its state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hiss_ros.errors import ShapeError
from hiss_ros.models.blocks import Stack, StackState
from hiss_ros.models.config import FlatConfig, HiSSConfig, ModelConfig
from hiss_ros.models.linear import linear

# Range of a predicted log-variance (normalised units), applied wherever one is read (the training
# loss, calibration, serving), so they all see the same variance: 1e-4 .. 1e4 times the training
# variance of the channel keeps exp() and the NLL's 1/variance finite in float32.
LOG_VAR_RANGE = (-9.21, 9.21)


class StreamState(NamedTuple):
    last_input: Tensor  # (B, I) last raw sample seen, for the delta channels
    primed: Tensor  # (B,) bool: False until a first sample was seen
    stack: StackState  # HiSS: the high-level stack; Flat: the only stack


class ChunkedModel(nn.Module):
    """Input checks, delta channels and the streaming loop common to HiSS and Flat."""

    config: ModelConfig

    def _check(self, x: Tensor, what: str) -> None:
        """ShapeError unless x is (B, L, I); ``what``: the method, named in the message."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.input_dim:
            raise ShapeError(f"{type(self).__name__}.{what}: expected shape (batch, length, {cfg.input_dim}), "
                             f"got {tuple(x.shape)}")

    def _features(self, x: Tensor, prev: Tensor) -> Tensor:
        """x (B, L, I) -> (B, L, I') with one-step differences appended when configured;
        ``prev`` (B, I) is the sample before x[:, 0]."""
        if not self.config.deltas:
            return x
        before = torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)  # (B, L, I)
        delta = x - before
        if self.config.scale_deltas:
            delta = delta / self.delta_std
        return torch.cat([x, delta], dim=-1)

    def _init_deltas(self) -> None:
        if self.config.scale_deltas:
            # (I,) fitted on training data by the trainer; a buffer, so the checkpoint carries it
            self.register_buffer("delta_std", torch.ones(self.config.input_dim))

    def set_delta_std(self, std: Tensor) -> None:
        """Scale of the delta channels, (I,) positive (``scale_deltas`` models only)."""
        if not self.config.scale_deltas:
            raise ValueError("set_delta_std: this model's config has scale_deltas false")
        if std.shape != self.delta_std.shape or not bool((std > 0).all()):
            raise ValueError(f"set_delta_std: expected {tuple(self.delta_std.shape)} positive values, got {std}")
        self.delta_std.copy_(std)

    @property
    def output_width(self) -> int:
        """W: the head's width, 2*O with the variance head (mean and log-variance), else O."""
        return self.config.output_dim * (2 if self.config.variance else 1)

    def split_output(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """y (..., W) -> mean (..., O) and log-variance (..., O) clamped to ``LOG_VAR_RANGE``, or
        None for a model without the variance head."""
        if not self.config.variance:
            return y, None
        mean, log_var = y.split(self.config.output_dim, dim=-1)
        return mean, log_var.clamp(*LOG_VAR_RANGE)

    @property
    def feature_dim(self) -> int:
        return self.config.input_dim * (2 if self.config.deltas else 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, I) -> (B, L // chunk, W), from zero state."""
        self._check(x, "forward")
        if x.shape[1] % self.config.chunk:
            raise ShapeError(
                f"{type(self).__name__}.forward: length {x.shape[1]} is not a multiple of chunk={self.config.chunk}"
            )
        return self._forward(self._features(x, x[:, 0]))

    def init_state(self, batch_size: int = 1) -> StreamState:
        p = next(self.parameters())
        return StreamState(
            torch.zeros(batch_size, self.config.input_dim, device=p.device, dtype=p.dtype),
            torch.zeros(batch_size, dtype=torch.bool, device=p.device),
            self.stack_for_state.init_state(batch_size, p.device, p.dtype),
        )

    def step_chunk(self, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """x (B, chunk, I) -> (y (B, W), new state); O(chunk) work however long the stream ran.
        The module path, the same in training and inference; ``StepRunner`` steps faster in
        inference."""
        self.check_chunk(x, state)
        return self._advance(x, state)

    def check_chunk(self, x: Tensor, state: StreamState, what: str = "step_chunk") -> None:
        """ShapeError unless x is one chunk (B, chunk, I) of the batch of ``state``."""
        self._check(x, what)
        if x.shape[1] != self.config.chunk or x.shape[0] != state.primed.shape[0]:
            raise ShapeError(
                f"{type(self).__name__}.{what}: expected shape ({state.primed.shape[0]}, "
                f"{self.config.chunk}, {self.config.input_dim}), got {tuple(x.shape)}"
            )

    def _advance(self, x: Tensor, state: StreamState, step: Callable | None = None) -> tuple[Tensor, StreamState]:
        """One checked chunk, the state carried; ``step`` (features, stack state) -> (y, stack
        state) is ``self._step`` unless given."""
        prev = torch.where(state.primed.unsqueeze(-1), state.last_input, x[:, 0])
        y, stack = (step or self._step)(self._features(x, prev), state.stack)
        return y, StreamState(x[:, -1], torch.ones_like(state.primed), stack)


class HiSS(ChunkedModel):
    def __init__(self, config: HiSSConfig) -> None:
        super().__init__()
        self.config = config
        self.low = Stack(self.feature_dim, config.low)
        self.high = Stack(config.low.d_model, config.high)
        self.head = linear(config.high.d_model, self.output_width)
        self._init_deltas()

    @property
    def stack_for_state(self) -> Stack:
        return self.high

    def _chunk_features(self, x: Tensor) -> Tensor:
        """x (B, K*chunk, I') -> (B, K, D_low): low stack over each chunk from zero state, read
        at the chunk's last sample or averaged over the chunk (``pool``)."""
        B, L, F = x.shape
        K = L // self.config.chunk
        low = self.low(x.reshape(B * K, self.config.chunk, F))  # (B*K, chunk, D_low)
        feature = low[:, -1] if self.config.pool == "last" else low.mean(1)  # (B*K, D_low)
        return feature.reshape(B, K, -1)

    def _forward(self, x: Tensor) -> Tensor:
        return self.head(self.high(self._chunk_features(x)))

    def _step(self, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        h, state = self.high.step(self._chunk_features(x)[:, 0], state)
        return self.head(h), state


class Flat(ChunkedModel):
    def __init__(self, config: FlatConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = Stack(self.feature_dim, config.layers)
        self.head = linear(config.layers.d_model, self.output_width)
        self._init_deltas()

    @property
    def stack_for_state(self) -> Stack:
        return self.layers

    def _forward(self, x: Tensor) -> Tensor:
        h = self.layers(x)  # (B, L, D)
        return self.head(h[:, self.config.chunk - 1 :: self.config.chunk])

    def _step(self, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        for t in range(x.shape[1]):
            h, state = self.layers.step(x[:, t], state)
        return self.head(h), state
