"""Selective scan for GPUs without mamba-ssm: a chunked parallel scan with a hand-written backward.

Shapes: B batch, L length, E inner channels, N state size, T chunk length, K = ceil(L / T) chunks.

Computes exactly what ``hiss_ros.models.scan.selective_scan`` computes, from zero state:
    h_t = exp(delta_t A) * h_{t-1} + delta_t * B_t * u_t          (per channel e, state n)
    y_t = sum_n C_t,n h_t,n

Why a second implementation: the CPU scan steps through L one time step at a time, which on a GPU
is L tiny kernel launches per layer (launch-bound: ~2000 x several launches for a 2000-sample
window). Here the number of launches grows with log L instead:

- Within each chunk of T steps (all chunks at once) the log-decays a_t = delta_t A (<= 0) are
  summed with ``cumsum`` into S_t, and the chunk-local states are built by log2(T) doubling steps
  (Hillis-Steele): h_t += exp(S_t - S_{t-k}) h_{t-k} for k = 1, 2, 4, ... Every exponent is a
  difference of cumulative sums inside one chunk, so it is <= 0 (no overflow, however long the
  sequence) and at most T steps' worth in size (the rounding of S stays small).
- The state carried into chunk k is itself a linear recurrence over the K chunk ends (decay
  exp(S_T) of each chunk, input its local end state): the same function, recursively, on a
  sequence T times shorter; each chunk then adds exp(S_t) * carried state.

Memory: a few (B, L, E, N) tensors at a time. The backward saves the states h (B, L, E, N) rather
than recomputing them (GPU memory is plentiful, a second scan is not free) and runs the adjoint
recurrence g_t = C_t dy_t + exp(a_{t+1}) g_{t+1} through the same scan, reversed in time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = 16


def linear_scan(log_decay: Tensor, x: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """h_t = exp(log_decay_t) * h_{t-1} + x_t along dim 1 from h_{-1} = 0, for log_decay <= 0.

    log_decay, x: (B, L, *rest) -> h (B, L, *rest). No autograd graph is needed through it (the
    callers' backward is hand-written), so it works in place on its own copies.
    """
    if chunk < 2:  # a chunk of 1 would recurse on a sequence as long as the input, forever
        raise ValueError(f"linear_scan: chunk = {chunk}, expected at least 2")
    batch, length, *rest = x.shape
    if length <= 1:
        return x.clone()
    T = min(chunk, length)
    K = -(-length // T)
    pad = K * T - length
    if pad:  # decay 1 and input 0 after the end: the padded states are discarded
        widths = [0, 0] * len(rest) + [0, pad]
        log_decay, x = F.pad(log_decay, widths), F.pad(x, widths)
    S = log_decay.reshape(batch, K, T, *rest).cumsum(2)  # (B, K, T, ...) log-decay since the chunk began
    h = x.reshape(batch, K, T, *rest).clone()  # becomes the chunk-local states, from zero at each chunk
    step = 1
    while step < T:  # after this step h_t sums the inputs of the last 2 * step positions of its chunk
        h[:, :, step:] += torch.exp(S[:, :, step:] - S[:, :, :-step]) * h[:, :, :-step]
        step *= 2
    if K > 1:
        ends = linear_scan(S[:, :, -1], h[:, :, -1], chunk)  # (B, K, ...) true state at each chunk's end
        carried = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # state entering chunk k
        h += torch.exp(S) * carried.unsqueeze(2)
    return h.reshape(batch, K * T, *rest)[:, :length]


def _log_decay(delta: Tensor, A: Tensor) -> Tensor:
    return delta.unsqueeze(-1) * A  # (B, L, E, N), <= 0 since delta > 0 and A < 0


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, chunk: int) -> Tensor:
        x = (delta * u).unsqueeze(-1) * Bm.unsqueeze(2)  # (B, L, E, N)
        h = linear_scan(_log_decay(delta, A), x, chunk)  # (B, L, E, N)
        ctx.chunk = chunk
        ctx.save_for_backward(u, delta, A, Bm, C, h)
        return torch.einsum("blen,bln->ble", h, C)

    @staticmethod
    def backward(ctx, gy: Tensor):
        u, delta, A, Bm, C, h = ctx.saved_tensors
        la = _log_decay(delta, A)  # (B, L, E, N)
        # Adjoint g_t = dloss/dh_t = C_t dy_t + exp(la_{t+1}) g_{t+1}: a forward scan in reversed time
        # whose decay at reversed position r is la_{L-r} (0 at r = 0, where nothing comes after).
        la_next = torch.cat([la[:, 1:], torch.zeros_like(la[:, :1])], dim=1)
        g = linear_scan(la_next.flip(1), (gy.unsqueeze(-1) * C.unsqueeze(2)).flip(1), ctx.chunk).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # h_{t-1}
        g_la = g * torch.exp(la) * h_prev  # dloss/d la_t, (B, L, E, N)
        P = torch.einsum("blen,bln->ble", g, Bm)  # dloss/d (delta u)
        gu = delta * P
        gdelta = u * P + torch.einsum("blen,en->ble", g_la, A)
        gA = torch.einsum("blen,ble->en", g_la, delta)
        gB = torch.einsum("blen,ble->bln", g, delta * u)
        gC = torch.einsum("blen,ble->bln", h, gy)
        return gu, gdelta, gA, gB, gC, None


def chunked_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """y (B, L, E) from zero state; the arguments of ``hiss_ros.models.scan.selective_scan``.

    Args:
        u: (B, L, E) input; delta: (B, L, E) positive step sizes; A: (E, N) (negative real);
        Bm, C: (B, L, N) input and output projections; chunk: steps per chunk of the parallel scan.
    """
    return _ChunkedScan.apply(u, delta, A, Bm, C, chunk)
