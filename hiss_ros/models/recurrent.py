"""Baseline mixers: LSTM and causal sliding-window Transformer.

Shapes: B batch, L length, D d_model, H heads, S head size (D / H), W attention window (context).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiss_ros.models.config import StackConfig


class LSTMState(NamedTuple):
    h: Tensor  # (1, B, D)
    c: Tensor  # (1, B, D)


class LSTM(nn.Module):
    """Single-layer LSTM mixer (the block stack supplies depth, norms and residuals)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LSTMState:
        zeros = torch.zeros(1, batch_size, self.lstm.hidden_size, device=device, dtype=dtype)
        return LSTMState(zeros, zeros.clone())

    def step(self, x: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        y, (h, c) = self.lstm(x.unsqueeze(1), tuple(state))
        return y[:, 0], LSTMState(h, c)


class AttentionState(NamedTuple):
    keys: Tensor  # (B, H, n, S) with n <= W - 1 past keys
    values: Tensor  # (B, H, n, S)


class CausalTransformer(nn.Module):
    """Causal self-attention over a sliding window of ``context`` samples, then a GELU MLP.

    Position enters as ALiBi distance penalties (-slope_h * (t - s)), which depend only on the
    distance, so the streaming step, which keeps the last ``context - 1`` keys and values,
    gives exactly the offline outputs: the window is the model, not a streaming approximation.
    """

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.window = cfg.n_heads, d // cfg.n_heads, cfg.context
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / cfg.n_heads) for i in range(cfg.n_heads)])
        self.register_buffer("slopes", slopes, persistent=False)  # (H,)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k, v each (B, H, L, S)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _mix(self, x: Tensor, attn: Tensor) -> Tensor:
        """attn (B, H, L, S) -> output (B, L, D) with the MLP sub-block."""
        B, _, L, _ = attn.shape
        y = self.proj(attn.transpose(1, 2).reshape(B, L, -1))
        return y + self.mlp(self.mlp_norm(y))

    def forward(self, x: Tensor) -> Tensor:
        """Queries in blocks of W: block [s, e) attends to keys [s - W + 1, e), all that its window
        can see, so time and memory grow as L * W, not L^2 (a whole 30 s recording at 400 Hz is
        L = 12,000: a dense (H, L, L) bias alone would take 2.3 GB)."""
        L, W = x.shape[1], self.window
        q, k, v = self._heads(x)
        slopes = -self.slopes.to(x.dtype).view(1, -1, 1, 1)
        out = []
        for s in range(0, L, W):
            e, k0 = min(s + W, L), max(0, s - W + 1)
            dist = (torch.arange(s, e, device=x.device).view(-1, 1)
                    - torch.arange(k0, e, device=x.device).view(1, -1)).to(x.dtype)  # (e - s, e - k0) t - u
            # (1, H, e - s, e - k0); 4-D so that PyTorch's fused CPU attention kernel takes it
            bias = (slopes * dist).masked_fill((dist < 0) | (dist >= W), -math.inf)
            out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, k0:e], v[:, :, k0:e], attn_mask=bias))
        return self._mix(x, torch.cat(out, dim=2))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty.clone())

    def step(self, x: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        q, k, v = self._heads(x.unsqueeze(1))  # (B, H, 1, S)
        keys = torch.cat([state.keys, k], dim=2)[:, :, -self.window:]  # (B, H, n, S)
        values = torch.cat([state.values, v], dim=2)[:, :, -self.window:]
        n = keys.shape[2]
        dist = torch.arange(n - 1, -1, -1, device=x.device, dtype=x.dtype)  # (n,) distance to now
        bias = -self.slopes.to(x.dtype).view(-1, 1, 1) * dist  # (H, 1, n)
        y = self._mix(x.unsqueeze(1), F.scaled_dot_product_attention(q, keys, values, attn_mask=bias))
        keep = max(0, n - (self.window - 1))  # the next step sees this one and W - 2 before it
        return y[:, 0], AttentionState(keys[:, :, keep:], values[:, :, keep:])
