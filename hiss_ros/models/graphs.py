"""The ``"graph"`` step backend: on CUDA, one step captured in a CUDA graph and replayed.

At batch 1 a step of the fast path is a few hundred small kernels, and on a GPU launching them one by
one from Python costs far more than running them. A CUDA graph records them once and replays them all
with one launch.

The graph reads the chunk and the state from tensors of its own and, as its last kernel, writes the
new state back into them (one multi-tensor copy). So the state it returns is that buffer: **the next
step of the same runner at the same batch size updates it in place**. Pass it back as the next step's
state, as ``StreamingEstimator`` and the node do, or copy it to keep it (``torch.utils._pytree.tree_map``
with ``Tensor.clone``). A state that is not its own (a fresh ``init_state`` after a reset) is copied in
before the replay. The output is returned as a new tensor.

The weights are read where they were when the graph was captured: new weights (a hot reload, a
parameter changed in place, which gathers them anew) capture the graph again, in milliseconds.
Capturing runs the step a few times first on a side stream (lazy kernel loading cannot happen inside
a capture) and records in this thread's mode, so another thread's CUDA work meanwhile does not spoil
it; then one replay is checked against the eager step (a ``RuntimeError`` if they differ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

WARMUP_STEPS = 3
TOLERANCE = 1e-4  # replayed against eager, relative to the output's largest entry (at least 1)


def capture(run: Callable[[], tuple[Tensor, Any]], commit: Callable[[Any], None], device: torch.device
            ) -> tuple[Tensor, Callable[[], None], Tensor]:
    """CUDA: ``run()`` (a pure step on static tensors -> (y, new state)) warmed up on a side stream, then
    captured with ``commit(new state)`` after it -> (the static y, replay, the warm-up's y)."""
    if device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device; this step runs on {device}")
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            expected, _ = run()  # pure: the static state is unchanged
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        y, new = run()
        commit(new)
    return y, graph.replay, expected


class GraphedStep:
    """``step(x, state) -> (y, state)`` replayed from a CUDA graph of ``fn`` (a pure step function of the
    same signature) for the shape, dtype and device of ``x`` and ``state``; see the module docstring."""

    def __init__(self, fn: Callable[[Tensor, Any], tuple[Tensor, Any]], x: Tensor, state: Any) -> None:
        leaves, spec = pytree.tree_flatten(state)
        # Plain tensors (not inference tensors), so that the step may run under inference_mode or no_grad.
        with torch.inference_mode(False), torch.no_grad():
            self._x = x.clone()
            self._leaves = [t.clone() for t in leaves]
            self._state = pytree.tree_unflatten(self._leaves, spec)
            self._y, self._replay, expected = capture(
                lambda: fn(self._x, self._state),
                lambda new: torch._foreach_copy_(self._leaves, pytree.tree_leaves(new)), x.device)
        self._types = [(t.dtype, t.device, t.shape) for t in self._leaves]
        # One replay against the eager step on the same input: a capture that recorded something else
        # (an operation that does not replay) is refused here, not served.
        self._replay()
        scale = max(1.0, expected.abs().max().item())
        if not (err := (self._y - expected).abs().max().item()) <= TOLERANCE * scale:
            raise RuntimeError(f"the CUDA graph of the step replays {err:.3g} away from the eager step: not used")

    def __call__(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        if x.dtype != self._x.dtype or x.device != self._x.device or x.shape != self._x.shape:
            raise ValueError(f"CUDA graph of a step for {self._x.dtype} {tuple(self._x.shape)} on {self._x.device}: "
                             f"the chunk is {x.dtype} {tuple(x.shape)} on {x.device}")
        self._x.copy_(x)
        if state is not self._state:  # not the state it returned last: copied in
            leaves = pytree.tree_leaves(state)
            if [(t.dtype, t.device, t.shape) for t in leaves] != self._types:
                raise ValueError(f"CUDA graph of a step: the state is {[(t.dtype, t.device) for t in leaves]}, "
                                 f"not the {[t[:2] for t in self._types]} it was captured for")
            torch._foreach_copy_(self._leaves, leaves)
        self._replay()
        return self._y.clone(), self._state
