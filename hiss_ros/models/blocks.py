"""Residual blocks and stacks shared by every model.

Shapes: B batch, L length, I input width, D d_model.

A block is prenorm: x + Dropout(Mixer(LayerNorm(x))). A stack is a linear encoder to D, the
blocks, and a final LayerNorm (the reference's Add -> Norm -> Mixer layout with a final norm).
Every mixer has ``forward`` over a sequence from zero state and ``step`` over one sample with a
typed state from ``init_state``; a stack offers the same three.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiss_ros.models.config import StackConfig
from hiss_ros.models.linear import linear
from hiss_ros.models.mamba import Mamba
from hiss_ros.models.recurrent import LSTM, CausalTransformer
from hiss_ros.models.s4d import S4D

# Registry: layer kind -> mixer class. Each takes a StackConfig.
MIXERS: dict[str, type[nn.Module]] = {
    "s4d": S4D,
    "mamba": Mamba,
    "lstm": LSTM,
    "transformer": CausalTransformer,
}


class Block(nn.Module):
    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mixer = MIXERS[cfg.kind](cfg)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.mixer(self.norm(x)), self.dropout, self.training)

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self.mixer.step(self.norm(x), state)
        return x + F.dropout(y, self.dropout, self.training), state


class StackState(NamedTuple):
    layers: tuple  # one mixer state per block


class Stack(nn.Module):
    def __init__(self, in_dim: int, cfg: StackConfig) -> None:
        super().__init__()
        self.encoder = linear(in_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, I) -> (B, L, D), from zero state."""
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        return self.norm_f(h)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> StackState:
        return StackState(tuple(b.mixer.init_state(batch_size, device, dtype) for b in self.blocks))

    def step(self, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        """x (B, I) -> (B, D), one sample."""
        h = self.encoder(x)
        new = []
        for block, s in zip(self.blocks, state.layers, strict=True):
            h, s = block.step(h, s)
            new.append(s)
        return self.norm_f(h), StackState(tuple(new))
