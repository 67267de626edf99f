"""Mamba (selective SSM) mixer in pure PyTorch, with mamba_ssm's CUDA kernels when available.

Shapes: B batch, L length, D d_model, E inner width (expand * D), N d_state, R dt_rank, W d_conv.

The parameter names and shapes are exactly those of ``mamba_ssm.modules.mamba_simple.Mamba``
(in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so a state dict moves between the two.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiss_ros.models.cache import ParamCache
from hiss_ros.models.config import StackConfig
from hiss_ros.models.linear import linear
from hiss_ros.models.scan import scan_impl, selective_scan_step

try:  # optional fast path (extra "cuda"); mamba_ssm imports only where CUDA is present
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:
    _cuda_selective_scan = None


def cuda_kernels_available() -> bool:
    """True when mamba_ssm's selective-scan kernel imported (CUDA machines with the extra)."""
    return _cuda_selective_scan is not None


class MambaState(NamedTuple):
    conv: Tensor  # (B, E, W - 1) last inputs of the depthwise conv
    ssm: Tensor  # (B, E, N)


class StepWeights(NamedTuple):
    """What one step reads, in the layout it reads it (``Mamba.step_weights``)."""

    in_t: Tensor  # (D, 2E) in_proj.weight.t()
    conv_w: Tensor  # (E, W)
    conv_b: Tensor  # (E,)
    x_t: Tensor  # (E, R + 2N) x_proj.weight.t()
    dt_t: Tensor  # (R, E) dt_proj.weight.t()
    dt_b: Tensor  # (E,)
    A: Tensor  # (E, N) -exp(A_log)
    D: Tensor  # (E,)
    out_t: Tensor  # (E, D) out_proj.weight.t()


def inner_step(w: StepWeights, hidden: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
    """hidden (B, D) -> gated SSM output (B, E) before out_proj, and the new state. Plain matmuls
    on pre-transposed weights and fused multiply-adds: at batch 1 the per-op cost is the cost."""
    x, z = torch.mm(hidden, w.in_t).chunk(2, dim=-1)  # (B, E) each
    window = torch.cat([state.conv, x.unsqueeze(-1)], dim=-1)  # (B, E, W)
    x = F.silu(torch.linalg.vecdot(window, w.conv_w) + w.conv_b)  # causal depthwise conv, newest tap
    dt, Bm, C = torch.mm(x, w.x_t).split([w.dt_t.shape[0], w.A.shape[1], w.A.shape[1]], dim=-1)
    delta = F.softplus(torch.addmm(w.dt_b, dt, w.dt_t))  # (B, E)
    y, ssm = selective_scan_step(state.ssm, x, delta, w.A, Bm, C)
    return torch.addcmul(y, x, w.D) * F.silu(z), MambaState(window[..., 1:], ssm)


class Mamba(nn.Module):
    def __init__(
        self, cfg: StackConfig, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4
    ) -> None:
        super().__init__()
        d, n, w = cfg.d_model, cfg.d_state, cfg.d_conv
        e = cfg.expand * d
        self.d_inner, self.d_state, self.d_conv = e, n, w
        self.dt_rank = math.ceil(d / 16)
        self.in_proj = linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, kernel_size=w, groups=e, padding=w - 1, bias=True)
        self.x_proj = linear(e, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = linear(self.dt_rank, e, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # bias = softplus^-1(dt), so softplus(dt_proj(0)) starts at dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32).repeat(e, 1)))  # (E, N)
        self.D = nn.Parameter(torch.ones(e))  # (E,)
        self.out_proj = linear(e, d, bias=False)
        self._A = ParamCache(lambda: -torch.exp(self.A_log))  # (E, N), cached while streaming

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., E) -> delta (..., E), B (..., N), C (..., N)."""
        dt, Bm, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), Bm, C

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, D) -> (B, L, D), from zero state."""
        L = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, L, E) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2))  # causal depthwise conv
        A = -torch.exp(self.A_log)  # (E, N)
        if x.is_cuda and _cuda_selective_scan is not None:
            dt, Bm, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            y = _cuda_selective_scan(
                x.transpose(1, 2).contiguous(), (dt @ self.dt_proj.weight.t()).transpose(1, 2).contiguous(),
                A.float(), Bm.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(),
                z=z.transpose(1, 2).contiguous(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            ).transpose(1, 2)  # (B, L, E), gated by z inside the kernel
        else:
            delta, Bm, C = self._ssm_inputs(x)
            y = scan_impl(x.device)(x, delta, A, Bm, C) + x * self.D
            y = y * F.silu(z)
        return self.out_proj(y)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MambaState:
        return MambaState(
            torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
        )

    def step_weights(self) -> StepWeights:
        return StepWeights(
            self.in_proj.weight.t(), self.conv1d.weight[:, 0], self.conv1d.bias, self.x_proj.weight.t(),
            self.dt_proj.weight.t(), self.dt_proj.bias, self._A.get([self.A_log]), self.D, self.out_proj.weight.t(),
        )

    def step(self, hidden: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """hidden (B, D) -> (B, D), one sample."""
        w = self.step_weights()
        y, state = inner_step(w, hidden, state)
        return torch.mm(y, w.out_t), state
