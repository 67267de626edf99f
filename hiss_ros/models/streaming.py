"""The fast step of a HiSS model: the arithmetic of ``HiSS.step_chunk`` with the overhead taken out.
``hiss_ros.models.runner.StepRunner`` decides when it runs, keeps its gathered weights and compiles it.

Shapes: B batch, L chunk, I' feature width, D width of a stack, H low width, E Mamba inner width.

At batch 1 a step is a few hundred tiny tensor operations (~16 MFLOP in all), so its cost is
per-operation overhead, Python's (module calls, attribute lookups) as much as the dispatcher's
(~2-4 us an operation on the benchmark CPU; the module path took ~2x longer). For an S4D low
stack and a Mamba high stack, ``step`` computes what the modules compute, up to summation order, with:
- every weight gathered once (``gather``) into plain tuples, in the layout the products read (the
  S4D chunk operator, Mamba's ``-exp(A_log)`` and transposed matrices included);
- the residual adds fused into the output products (``addmm``) and dropout (identity) dropped;
- the low stack's last block evaluated at the chunk's last sample only, the one HiSS reads.
It is for inference only (eval mode, autograd off); the runner takes the module path otherwise,
and for what the fast step does not cover (``StepRunner.uncovered``).

Compiled (the runner's ``"compile"`` backend, ``hiss_ros.models.aot``): the same function compiled
ahead of time by AOTInductor into a shared library, which fuses the element-wise work into
generated C++ loops and is called without Python or the dispatcher in between.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiss_ros.models.blocks import Stack, StackState
from hiss_ros.models.mamba import StepWeights, inner_step
from hiss_ros.models.s4d import apply_chunk_operator


class Norm(NamedTuple):
    weight: Tensor  # (D,)
    bias: Tensor  # (D,)
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _norm(layer: nn.LayerNorm) -> Norm:
    return Norm(layer.weight, layer.bias, layer.eps)


class S4DBlock(NamedTuple):
    norm: Norm
    T: Tensor  # (L_t, L_s, H) chunk operator
    out_t: Tensor  # (H, 2H) out.weight.t()
    out_b: Tensor  # (2H,)


class MambaBlock(NamedTuple):
    norm: Norm
    mamba: StepWeights


class StackWeights(NamedTuple):
    enc_t: Tensor  # (I, D) encoder.weight.t()
    enc_b: Tensor  # (D,)
    blocks: tuple  # S4DBlock or MambaBlock per block
    norm_f: Norm


def _stack(stack: Stack, blocks: list) -> StackWeights:
    return StackWeights(stack.encoder.weight.t(), stack.encoder.bias, tuple(blocks), _norm(stack.norm_f))


class Weights(NamedTuple):
    low: StackWeights  # of S4DBlock
    high: StackWeights  # of MambaBlock
    head_t: Tensor  # (D_high, W) head.weight.t(); W = O, or 2*O with the variance head
    head_b: Tensor  # (W,)


def gather(model: nn.Module) -> Weights:
    """The weights of a HiSS model (S4D low, Mamba high) as the fast step reads them."""
    low = [S4DBlock(_norm(b.norm), b.mixer.chunk_operator(model.config.chunk), b.mixer.out.weight.t(), b.mixer.out.bias)
           for b in model.low.blocks]
    high = [MambaBlock(_norm(b.norm), b.mixer.step_weights()) for b in model.high.blocks]
    return Weights(_stack(model.low, low), _stack(model.high, high), model.head.weight.t(), model.head.bias)


def low_last(w: StackWeights, x: Tensor) -> Tensor:
    """S4D stack over one chunk from zero state: x (B, L, I') -> its output at the last sample (B, H)."""
    B, L, _ = x.shape
    h = torch.addmm(w.enc_b, x.reshape(B * L, -1), w.enc_t).view(B, L, -1)  # (B, L, H)
    *blocks, last = w.blocks
    for b in blocks:
        y = apply_chunk_operator(b.T, b.norm(h)).view(B * L, -1)  # (B*L, H)
        y = F.gelu(y.t()).t()  # over a transposed view: the native kernel, ~2x faster here than oneDNN's
        h = h + F.glu(torch.addmm(b.out_b, y, b.out_t), dim=-1).view(B, L, -1)
    y = F.gelu(apply_chunk_operator(last.T[-1:], last.norm(h))[:, 0])  # (B, H), last sample only
    return w.norm_f(h[:, -1] + F.glu(torch.addmm(last.out_b, y, last.out_t), dim=-1))


def high_step(w: StackWeights, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
    """Mamba stack, one step: x (B, I) -> (B, D)."""
    h = torch.addmm(w.enc_b, x, w.enc_t)  # (B, D)
    layers = []
    for b, s in zip(w.blocks, state.layers, strict=True):
        y, s = inner_step(b.mamba, b.norm(h), s)
        h = torch.addmm(h, y, b.mamba.out_t)  # residual + out_proj(y)
        layers.append(s)
    return w.norm_f(h), StackState(tuple(layers))


def step(w: Weights, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
    """x (B, L, I') chunk features -> (y (B, W), new high-stack state)."""
    h, state = high_step(w.high, low_last(w.low, x), state)
    return torch.addmm(w.head_b, h, w.head_t), state
