"""Selective scan (Mamba's SSM core) for CPU, with a hand-written backward.

Shapes: B batch, L length, E inner channels (expand * d_model), N state size, T block length.

From zero state, per channel e and state n:
    h_t = exp(delta_t A) * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t,n h_t,n
(Mamba's D skip and z gate are applied by the caller.)

Why not plain autograd: a loop over t builds a graph of L slices whose backward writes a full
(B, L, E, N) gradient per slice, and materialising exp(delta A) for the whole sequence costs
B*L*E*N memory per layer. Here the sequence is processed in blocks of T steps: the forward keeps
only the state at each block start; the backward recomputes one block at a time and runs the
adjoint recurrence  g_t = C_t y'_t + exp(delta_{t+1} A) g_{t+1}  backwards through it, so memory
is O(B*T*E*N) and every product outside the time loop is a batched einsum.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BLOCK = 64


def _block_terms(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor) -> tuple[Tensor, Tensor]:
    """Time-major exp(delta A) and delta*B*u for one block: each (T, B, E, N), contiguous."""
    dA = torch.exp(delta.transpose(0, 1).unsqueeze(-1) * A)  # (T, B, E, N)
    dBu = (delta * u).transpose(0, 1).unsqueeze(-1) * Bm.transpose(0, 1).unsqueeze(2)  # (T, B, E, N)
    return dA, dBu


def _scan_block(dA: Tensor, dBu: Tensor, h: Tensor) -> Tensor:
    """Run the recurrence over one block in place: dBu[t] becomes h_t. Returns h_T."""
    for t in range(dA.shape[0]):
        h = dBu[t].addcmul_(dA[t], h)
    return h


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, block: int) -> Tensor:
        batch, length, inner = u.shape
        h = u.new_zeros(batch, inner, A.shape[1])  # (B, E, N)
        y = torch.empty_like(u)  # (B, L, E)
        starts = []
        for t0 in range(0, length, block):
            t1 = min(t0 + block, length)
            starts.append(h)
            dA, hs = _block_terms(u[:, t0:t1], delta[:, t0:t1], A, Bm[:, t0:t1])
            h = _scan_block(dA, hs, h).clone()  # a copy, so the block buffer can be freed
            y[:, t0:t1] = torch.einsum("tben,btn->bte", hs, C[:, t0:t1])
        ctx.block = block
        ctx.save_for_backward(u, delta, A, Bm, C, torch.stack(starts))
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        u, delta, A, Bm, C, starts = ctx.saved_tensors
        block = ctx.block
        length = u.shape[1]
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gB, gC = torch.empty_like(Bm), torch.empty_like(C)
        gA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # exp(delta_{t+1} A) * g_{t+1}, (B, E, N)
        for i in reversed(range(len(starts))):
            t0 = i * block
            t1 = min(t0 + block, length)
            u_b, d_b, B_b, C_b, gy_b = u[:, t0:t1], delta[:, t0:t1], Bm[:, t0:t1], C[:, t0:t1], gy[:, t0:t1]
            dA, hs = _block_terms(u_b, d_b, A, Bm[:, t0:t1])
            _scan_block(dA, hs, starts[i])  # hs[t] = h_t, recomputed
            gC[:, t0:t1] = torch.einsum("tben,bte->btn", hs, gy_b)
            g = gy_b.transpose(0, 1).unsqueeze(-1) * C_b.transpose(0, 1).unsqueeze(2)  # (T, B, E, N)
            g_dA = torch.empty_like(g)  # becomes g_t * dA_t * h_{t-1}
            for t in reversed(range(t1 - t0)):
                carry = torch.mul(g[t].add_(carry), dA[t], out=g_dA[t])
            carry = carry.clone()  # g_dA is multiplied by h_{t-1} in place next
            g_dA[1:].mul_(hs[:-1])
            g_dA[0].mul_(starts[i])
            P = torch.einsum("tben,btn->bte", g, B_b)  # d loss / d (delta u)
            gu[:, t0:t1] = d_b * P
            gdelta[:, t0:t1] = u_b * P + torch.einsum("tben,en->bte", g_dA, A)
            gA += torch.einsum("tben,bte->en", g_dA, d_b)
            gB[:, t0:t1] = torch.einsum("tben,bte->btn", g, d_b * u_b)
        return gu, gdelta, gA, gB, gC, None


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, block: int = DEFAULT_BLOCK
) -> Tensor:
    """y (B, L, E) from zero state.

    Args:
        u: (B, L, E) input; delta: (B, L, E) positive step sizes; A: (E, N) (negative real);
        Bm, C: (B, L, N) input and output projections; block: time steps per recomputed block.
    """
    return _SelectiveScan.apply(u.contiguous(), delta.contiguous(), A, Bm.contiguous(), C.contiguous(), block)


def selective_scan_step(
    h: Tensor, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One step: h (B, E, N), u/delta (B, E), Bm/C (B, N) -> (y (B, E), new h)."""
    h = torch.exp(delta.unsqueeze(-1) * A) * h + (delta * u).unsqueeze(-1) * Bm.unsqueeze(1)
    return torch.einsum("ben,bn->be", h, C), h
