"""S4D: diagonal structured state space layer (Gu et al. 2022), ZOH discretisation.

Shapes: B batch, L length, H channels (d_model), N complex modes per channel (d_state).

Per channel, with A_n = -exp(log_A_real_n) + i A_imag_n and step dt:
    x_k = exp(dt A) x_{k-1} + (exp(dt A) - 1) / A * u_k          (complex, N modes)
    y_k = 2 Re(sum_n C_n x_k,n) + D u_k
Unrolled from zero state this is the causal convolution y = K * u + D u with
    K[l] = 2 Re sum_n C_n (exp(dt A_n) - 1) / A_n * exp(dt A_n l),
which ``forward`` applies by FFT (long sequences) or by a Toeplitz matmul (short ones, such as
HiSS chunks), and ``step`` applies as the recurrence.
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

# Below this length the O(L^2) Toeplitz product beats two FFTs on CPU.
TOEPLITZ_MAX_LEN = 64
# Up to this many products (B*L*L*H) a broadcast multiply-sum beats einsum's batched tiny
# matmuls several times over (the streaming case: one chunk, batch 1); above it, einsum.
_BROADCAST_MAX = 1 << 20


def apply_chunk_operator(T: Tensor, u: Tensor) -> Tensor:
    """T (L_t, L_s, H) from ``S4D.chunk_operator``, u (B, L_s, H) -> (B, L_t, H): y_t = sum_s T[t, s] u_s.
    T may be a slice of the operator's rows (the outputs at those samples only)."""
    if u.shape[0] * T.numel() <= _BROADCAST_MAX:
        return (T * u.unsqueeze(1)).sum(2)  # (B, L_t, L_s, H) -> (B, L_t, H)
    return torch.einsum("tsh,bsh->bth", T, u)


class S4DState(NamedTuple):
    x: Tensor  # (B, H, N) complex SSM state


class S4D(nn.Module):
    """S4D layer: SSM per channel, then GELU and a GLU output projection (as in the S4D paper)."""

    def __init__(self, cfg: StackConfig, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        h, n = cfg.d_model, cfg.d_state
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (H,)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(h, n)))  # (H, N) S4D-Lin
        self.A_imag = nn.Parameter(math.pi * torch.arange(n).float().repeat(h, 1))  # (H, N)
        self.C = nn.Parameter(torch.randn(h, n, 2) * math.sqrt(0.5))  # (H, N, 2) complex as pairs
        self.D = nn.Parameter(torch.randn(h))  # (H,)
        self.out = linear(h, 2 * h)  # GLU halves it back to H
        self._chunk_operator = ParamCache(self._toeplitz)  # streaming: one (L, L, H) per chunk length
        self._step_terms = ParamCache(self._discrete)

    def _discrete(self) -> tuple[Tensor, Tensor]:
        """(dt A, C * (exp(dt A) - 1) / A), each (H, N) complex."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # (H, N)
        dtA = A * torch.exp(self.log_dt).unsqueeze(-1)  # (H, N)
        CB = torch.view_as_complex(self.C) * (torch.exp(dtA) - 1.0) / A
        return dtA, CB

    def kernel(self, length: int) -> Tensor:
        """Convolution kernel K (H, L), real."""
        dtA, CB = self._discrete()
        powers = torch.arange(length, device=dtA.device, dtype=dtA.real.dtype)  # (L,)
        vander = torch.exp(dtA.unsqueeze(-1) * powers)  # (H, N, L) = exp(dt A)^l
        return 2.0 * torch.einsum("hn,hnl->hl", CB, vander).real

    def _toeplitz(self, length: int) -> Tensor:
        """The whole SSM over ``length`` samples as one operator T (L_t, L_s, H):
        T[t, s, h] = K[h, t - s] for s <= t (else 0), plus the skip D[h] where s == t."""
        K = self.kernel(length)  # (H, L)
        idx = torch.arange(length, device=K.device)
        lag = idx.view(-1, 1) - idx.view(1, -1)  # (L_t, L_s) t - s
        T = K[:, lag.clamp(min=0)] * (lag >= 0)  # (H, L_t, L_s)
        T = T.permute(1, 2, 0) + torch.eye(length, dtype=K.dtype, device=K.device).unsqueeze(-1) * self.D
        return T.contiguous()  # H innermost: the product in apply_chunk_operator is ~6x slower over a permuted view

    @property
    def _params(self) -> tuple[Tensor, ...]:
        return (self.log_dt, self.log_A_real, self.A_imag, self.C, self.D)

    def chunk_operator(self, length: int) -> Tensor:
        """T (L_t, L_s, H) of ``_toeplitz``, cached while autograd is off (length <= TOEPLITZ_MAX_LEN)."""
        return self._chunk_operator.get(self._params, length)

    def _ssm(self, u: Tensor) -> Tensor:
        """u (B, L, H) -> y (B, L, H), SSM part only (convolution + skip)."""
        L = u.shape[1]
        if L <= TOEPLITZ_MAX_LEN:
            return apply_chunk_operator(self.chunk_operator(L), u)
        K = self.kernel(L)  # (H, L)
        n_fft = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n_fft) * torch.fft.rfft(K, n=n_fft), n=n_fft)
        return y[..., :L].transpose(1, 2) + u * self.D

    def _output(self, y: Tensor) -> Tensor:
        return F.glu(self.out(F.gelu(y)), dim=-1)

    def forward(self, u: Tensor) -> Tensor:
        """u (B, L, H) -> (B, L, H), from zero state."""
        return self._output(self._ssm(u))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> S4DState:
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return S4DState(torch.zeros(batch_size, *self.log_A_real.shape, device=device, dtype=cdtype))

    def step(self, u: Tensor, state: S4DState) -> tuple[Tensor, S4DState]:
        """u (B, H) -> (B, H), one sample of the recurrence."""
        dtA, CB = self._step_terms.get(self._params)
        # The state is kept in units of B~ (x' = x / B~), so B~ folds into the readout CB:
        # x'_k = exp(dt A) x'_{k-1} + u_k,  y_k = 2 Re(sum_n CB_n x'_k,n) + D u_k.
        x = torch.exp(dtA) * state.x + u.unsqueeze(-1)  # (B, H, N)
        y = 2.0 * torch.einsum("hn,bhn->bh", CB, x).real + u * self.D
        return self._output(y), S4DState(x)
