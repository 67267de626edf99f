"""Selective scan (Mamba's SSM core) for CPU, with a hand-written backward.

Shapes: B batch, L length, E inner channels (expand * d_model), N state size, T block length.

From zero state, per channel e and state n:
    h_t = exp(delta_t A) * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t,n h_t,n
(Mamba's D skip and z gate are applied by the caller.)

Why not plain autograd: a loop over t builds a graph of L slices whose backward writes a full
(B, L, E, N) gradient per slice, and materialising exp(delta A) for the whole sequence (as a
parallel scan does) moves B*L*E*N floats through memory several times per layer. Here the
sequence is processed time-major in blocks of T steps small enough to stay in cache: the forward
keeps only the state at each block start; the backward recomputes one block at a time and runs
the adjoint recurrence  g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}  backwards through it, so
memory is O(B*T*E*N) and every product outside the time loop is a batched einsum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hiss_ros.models.parallel_scan import chunked_selective_scan

DEFAULT_BLOCK = 16


def _block_terms(dt: Tensor, du: Tensor, A: Tensor, Bt: Tensor, bufs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """exp(delta A) and delta*u*B for one time-major block, each (T, B, E, N), written into
    ``bufs`` (reused across blocks: fresh multi-MB allocations per block cost page faults)."""
    n = dt.shape[0]
    dA = torch.mul(dt.unsqueeze(-1), A, out=bufs[0][:n]).exp_()
    dBu = torch.mul(du.unsqueeze(-1), Bt.unsqueeze(2), out=bufs[1][:n])
    return dA, dBu


def _buffers(ref: Tensor, block: int, batch: int, inner: int, state: int, count: int) -> list[Tensor]:
    return [ref.new_empty(block, batch, inner, state) for _ in range(count)]


def _scan_block(dA: Tensor, dBu: Tensor, h: Tensor) -> Tensor:
    """Run the recurrence over one block in place: dBu[t] becomes h_t. Returns h_T."""
    for t in range(dA.shape[0]):
        h = dBu[t].addcmul_(dA[t], h)
    return h


def _time_major(*tensors: Tensor) -> list[Tensor]:
    return [x.transpose(0, 1).contiguous() for x in tensors]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, block: int) -> Tensor:
        ut, dt, Bt, Ct = _time_major(u, delta, Bm, C)  # (L, B, E) and (L, B, N)
        du = dt * ut
        length, batch, inner = ut.shape
        h = u.new_zeros(batch, inner, A.shape[1])  # (B, E, N)
        y = torch.empty_like(ut)  # (L, B, E)
        bufs = _buffers(u, min(block, length), batch, inner, A.shape[1], 2)
        starts = []
        for t0 in range(0, length, block):
            t1 = min(t0 + block, length)
            starts.append(h)
            dA, hs = _block_terms(dt[t0:t1], du[t0:t1], A, Bt[t0:t1], bufs)
            h = _scan_block(dA, hs, h).clone()  # a copy, so the block buffer can be freed
            # y_t = <h_t, C_t>, written straight into y: (T*B, E, N) @ (T*B, N, 1)
            torch.bmm(hs.view(-1, inner, hs.shape[-1]), Ct[t0:t1].reshape(-1, hs.shape[-1], 1),
                      out=y[t0:t1].view(-1, inner, 1))
        ctx.block = block
        ctx.save_for_backward(ut, dt, A, Bt, Ct, torch.stack(starts))
        return y.transpose(0, 1)

    @staticmethod
    def backward(ctx, gy: Tensor):
        ut, dt, A, Bt, Ct, starts = ctx.saved_tensors
        (gyt,) = _time_major(gy)  # (L, B, E)
        block = ctx.block
        du = dt * ut
        gut, gdt = torch.empty_like(ut), torch.empty_like(dt)
        gBt, gCt = torch.empty_like(Bt), torch.empty_like(Ct)
        gA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # exp(delta_{t+1} A) * g_{t+1}, (B, E, N)
        length, batch, inner = ut.shape
        bufs = _buffers(ut, min(block, length), batch, inner, A.shape[1], 4)
        for i in reversed(range(len(starts))):
            t0 = i * block
            b = slice(t0, min(t0 + block, length))
            n = b.stop - t0
            dA, hs = _block_terms(dt[b], du[b], A, Bt[b], bufs[:2])
            _scan_block(dA, hs, starts[i])  # hs[t] = h_t, recomputed
            gCt[b] = torch.einsum("tben,tbe->tbn", hs, gyt[b])
            g = torch.mul(gyt[b].unsqueeze(-1), Ct[b].unsqueeze(2), out=bufs[2][:n])  # (T, B, E, N), becomes g_t
            g_dA = bufs[3][:n]  # becomes g_t * dA_t * h_{t-1}
            for t in reversed(range(g.shape[0])):
                carry = torch.mul(g[t].add_(carry), dA[t], out=g_dA[t])
            carry = carry.clone()  # g_dA is multiplied by h_{t-1} in place next
            g_dA[1:].mul_(hs[:-1])
            g_dA[0].mul_(starts[i])
            P = torch.einsum("tben,tbn->tbe", g, Bt[b])  # d loss / d (delta u)
            gBt[b] = torch.einsum("tben,tbe->tbn", g, du[b])
            gut[b] = dt[b] * P
            # Reductions that keep e in place (an einsum here would batch over e and copy);
            # g's buffer is free from here on and takes the product.
            gdt[b] = ut[b] * P + torch.mul(g_dA, A, out=g).sum(-1)
            gA += g_dA.mul_(dt[b].unsqueeze(-1)).sum((0, 1))
        return gut.transpose(0, 1), gdt.transpose(0, 1), gA, gBt.transpose(0, 1), gCt.transpose(0, 1), None


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor, block: int = DEFAULT_BLOCK
) -> Tensor:
    """y (B, L, E) from zero state.

    Args:
        u: (B, L, E) input; delta: (B, L, E) positive step sizes; A: (E, N) (negative real);
        Bm, C: (B, L, N) input and output projections; block: time steps per recomputed block.
    """
    return _SelectiveScan.apply(u, delta, A, Bm, C, block)


def scan_impl(device: torch.device) -> Callable[..., Tensor]:
    """The pure-PyTorch selective scan for tensors on ``device`` (same arguments and result):
    on CUDA the chunked parallel scan, since a loop over time steps is launch-bound there; on
    the CPU the blocked sequential scan above, which keeps its working set in cache."""
    return chunked_selective_scan if device.type == "cuda" else selective_scan


def selective_scan_step(
    h: Tensor, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One step: h (B, E, N), u/delta (B, E), Bm/C (B, N) -> (y (B, E), new h)."""
    h = torch.addcmul(torch.exp(delta.unsqueeze(-1) * A) * h, (delta * u).unsqueeze(-1), Bm.unsqueeze(1))
    return torch.bmm(h, C.unsqueeze(-1)).squeeze(-1), h  # (B, E, N) @ (B, N, 1): einsum's overhead dominates here
