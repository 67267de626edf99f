"""How a model steps while serving: ``StepRunner``, outside the ``nn.Module``.

    runner = StepRunner(model)                     # backend "eager"; "compile" with a C++ compiler;
                                                   # "graph" on CUDA
    y_k, state = runner.step(x_k, state)           # the contract of model.step_chunk, same outputs
    runner.compile()                               # compile ahead (any thread), then:
    runner.set_backend("compile")

For a model the fast step covers (``uncovered`` is None: HiSS with an S4D low level, a Mamba high
level, pool ``last`` and chunk <= ``TOEPLITZ_MAX_LEN``), in eval mode with autograd off, a step runs
``hiss_ros.models.streaming.step`` on weights gathered once into plain tuples (gathered again when a
parameter is updated in place, replaced, moved or converted: ``ParamCache``, checked each step), or,
with the ``"compile"`` backend, that function compiled ahead of time (``hiss_ros.models.aot``: a
shared library per architecture, batch size, dtype, device and (on the CPU) torch thread count, cached
on disk; the weights are its inputs, so new weights need no new compile), or, with the ``"graph"``
backend on CUDA, that function captured in a CUDA graph and replayed with one launch
(``hiss_ros.models.graphs``: the state it returns is its own buffer, updated in place by the next step).
Anything else (training, autograd, another model) calls ``model.step_chunk``, the module path.

The runner holds no parameters: the model's state dict and checkpoints do not see it. It follows
the model's parameters, not its structure: a submodule swapped for another after the runner was
made is not seen (make a new runner).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hiss_ros.models.aot import CompiledStep, compiled_step, step_inputs, threads_compiled_for
from hiss_ros.models.cache import ParamCache
from hiss_ros.models.graphs import GraphedStep
from hiss_ros.models.hiss import ChunkedModel, StreamState
from hiss_ros.models.s4d import TOEPLITZ_MAX_LEN
from hiss_ros.models.streaming import Weights, gather
from hiss_ros.models.streaming import step as fast_step

STEP_BACKENDS = ("eager", "compile", "graph")


def _advance_fast(model: ChunkedModel, w: Weights, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
    """One checked chunk through the fast step."""
    return model._advance(x, state, partial(fast_step, w))


def _variant(w: Weights, batch_size: int) -> tuple:
    """What a compiled step is made for: batch size, dtype and device (of the weights), and on the CPU
    torch's thread count (its parallel loops are compiled for it)."""
    return batch_size, w.head_b.dtype, w.head_b.device, threads_compiled_for(w.head_b.device)


class StepRunner:
    """Steps one model, fast where it can; see the module docstring."""

    def __init__(self, model: ChunkedModel, backend: str = "eager") -> None:
        self.model = model
        self._covered = self.uncovered(model.config) is None
        # (module._parameters, name) of every parameter, and the same of every buffer (an input of the
        # compiled step): one replaced is seen
        self._slots = [(d, n) for m in model.modules() for d in (m._parameters, m._buffers)
                       for n, p in d.items() if p is not None]
        self._weights: ParamCache[Weights] = ParamCache(partial(gather, model))
        self._compiled: dict[tuple, CompiledStep] = {}  # _variant -> its compiled step
        self._flat: tuple[Any, list[Tensor]] = (None, [])  # (gathered weights, step_inputs for the compiled step)
        self._graphs: dict[int, tuple[Weights, GraphedStep]] = {}  # batch size -> (the weights it read, its graph)
        self._backend = "eager"
        self.set_backend(backend)

    @staticmethod
    def uncovered(config: Any) -> str | None:
        """Why the fast (and compiled) step does not cover a model config, or None when it does."""
        if getattr(config, "kind", None) != "hiss":
            return f"it covers HiSS models only; this is a {type(config).__name__.removesuffix('Config')} model"
        if config.low.kind != "s4d" or config.high.kind != "mamba" or config.chunk > TOEPLITZ_MAX_LEN:
            return (f"it covers HiSS with an S4D low level, a Mamba high level and chunk <= {TOEPLITZ_MAX_LEN}; "
                    f"this model has low {config.low.kind!r}, high {config.high.kind!r}, chunk {config.chunk}")
        if config.pool != "last":  # low_last evaluates the last block at the chunk's last sample only
            return f"it covers pool 'last' only; this model has pool {config.pool!r}"
        return None

    @property
    def backend(self) -> str:
        """How ``step`` runs in eval without autograd: ``"eager"``, ``"compile"`` or ``"graph"``."""
        return self._backend

    def set_backend(self, backend: str) -> None:
        """``"eager"`` (default) or ``"compile"``: the fast step compiled ahead of time
        (``hiss_ros.models.aot``), ~6x faster back to back and ~3x after idle for the shipped contact
        model; needs a C++ compiler and compiles (or loads from the cache) at the first step of a
        batch size unless ``compile`` ran. ``"graph"``: on CUDA, the fast step captured in a CUDA graph
        at the first step of a batch size (and again after new weights), replayed with one launch.
        ``ValueError`` for an unknown backend, for ``"compile"`` or ``"graph"`` on a model they do not
        cover, or for ``"graph"`` on a model that is not on a CUDA device, saying why."""
        if backend not in STEP_BACKENDS:
            raise ValueError(f"step backend {backend!r}: expected one of {', '.join(STEP_BACKENDS)}")
        if backend != "eager":
            self._require_covered(backend)
        if backend == "graph" and (device := next(self.model.parameters()).device).type != "cuda":
            raise ValueError(f"step backend 'graph' needs the model on a CUDA device; this one is on {device}")
        self._backend = backend

    def compile(self, batch_size: int = 1, progress: Callable[[str], object] | None = None) -> None:
        """Compile (or load from the on-disk cache) the ``"compile"`` backend's step for
        ``batch_size`` now, without switching to it; ``set_backend("compile")`` then takes it at
        once. Safe in another thread while this runner steps eagerly; ``progress(message)`` is told
        before a compile that is not cached. ``ValueError`` as ``set_backend``; the compiler's own
        errors when compiling fails (no C++ compiler, ...)."""
        self._require_covered("compile")
        with torch.inference_mode():
            weights = self.weights()
        if (key := _variant(weights, batch_size)) not in self._compiled:
            self._compiled[key] = compiled_step(self.model, weights, batch_size, progress)

    def applies(self) -> bool:
        """Whether a step now takes the fast (or compiled) step: a covered model, in eval mode,
        autograd off."""
        return self._covered and not self.model.training and not torch.is_grad_enabled()

    def weights(self) -> Weights:
        """The model's weights as the fast step reads them, gathered again after any change (cached
        while autograd is off)."""
        return self._weights.get([d[name] for d, name in self._slots])  # ~130 for the paper model

    def step(self, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """x (B, chunk, I) -> (y (B, W), new state), as ``model.step_chunk`` (its shape checks too). With
        the ``"graph"`` backend the new state is the graph's own buffer: this runner's next step of that
        batch size overwrites it (step one stream per runner, or copy the state to keep it)."""
        model = self.model
        if not self.applies():
            return model.step_chunk(x, state)
        model.check_chunk(x, state)
        w = self.weights()
        if self._backend == "graph":
            weights, graphed = self._graphs.get(x.shape[0], (None, None))
            if weights is not w:  # first step of this batch size, or new weights: capture (again)
                graphed = GraphedStep(partial(_advance_fast, model, w), x, state)
                self._graphs[x.shape[0]] = (w, graphed)
            return graphed(x, state)
        if self._backend == "compile":
            if (compiled := self._compiled.get(_variant(w, x.shape[0]))) is None:
                self.compile(x.shape[0])  # not compiled ahead: now, or loaded from the cache
                compiled = self._compiled[_variant(w, x.shape[0])]
            if self._flat[0] is not w:  # new weights (or buffers): what the compiled step reads
                self._flat = (w, step_inputs(model, w))
            return compiled(x, state, self._flat[1])
        return _advance_fast(model, w, x, state)

    def _require_covered(self, backend: str) -> None:
        reason = self.uncovered(self.model.config)
        if reason:
            raise ValueError(f"step backend {backend!r} does not apply to this model: {reason}")
