"""How a model steps while serving: ``StepRunner``, outside the ``nn.Module``.

    runner = StepRunner(model)                     # backend "eager"; "compile" with a C++ compiler
    y_k, state = runner.step(x_k, state)           # the contract of model.step_chunk, same outputs
    runner.compile()                               # compile ahead (any thread), then:
    runner.set_backend("compile")

For a model the fast step covers (``uncovered`` is None: HiSS with an S4D low level, a Mamba high
level, pool ``last`` and chunk <= ``TOEPLITZ_MAX_LEN``), in eval mode with autograd off, a step runs
``hiss_ros.models.streaming.step`` on weights gathered once into plain tuples (gathered again when a
parameter is updated in place, replaced, moved or converted: ``ParamCache``, checked each step), or,
with the ``"compile"`` backend under ``torch.inference_mode``, that function through torch.compile.
Anything else (training, autograd, another model) calls ``model.step_chunk``, the module path.

The runner holds no parameters: the model's state dict and checkpoints do not see it. It follows
the model's parameters, not its structure: a submodule swapped for another after the runner was
made is not seen (make a new runner).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hiss_ros.models.cache import ParamCache
from hiss_ros.models.hiss import ChunkedModel, StreamState
from hiss_ros.models.s4d import TOEPLITZ_MAX_LEN
from hiss_ros.models.streaming import Weights, compile_fast, gather
from hiss_ros.models.streaming import step as fast_step

STEP_BACKENDS = ("eager", "compile")


def _advance_fast(model: ChunkedModel, w: Weights, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
    """One checked chunk through the fast step (the function torch.compile compiles: its variants
    are kept on this code, shared by every runner of the process)."""
    return model._advance(x, state, partial(fast_step, w))


class StepRunner:
    """Steps one model, fast where it can; see the module docstring."""

    def __init__(self, model: ChunkedModel, backend: str = "eager") -> None:
        self.model = model
        self._covered = self.uncovered(model.config) is None
        # (module._parameters, name) of every parameter: a parameter replaced is seen
        self._slots = [(m._parameters, n) for m in model.modules() for n, p in m._parameters.items() if p is not None]
        self._weights: ParamCache[Weights] = ParamCache(partial(gather, model))
        self._compiled: Any = None  # _advance_fast through compile_fast, made at the first use
        self._compile = False  # the backend: through torch.compile instead of eagerly
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
        """How ``step`` runs in eval without autograd: ``"eager"`` or ``"compile"``."""
        return "compile" if self._compile else "eager"

    def set_backend(self, backend: str) -> None:
        """``"eager"`` (default) or ``"compile"``: the fast step through torch.compile under
        ``torch.inference_mode``, ~1.4x faster for the paper-size HiSS; needs a C++ compiler and
        compiles at the first step unless ``compile`` ran. ``ValueError`` for an unknown backend, or
        for ``"compile"`` on a model it does not cover, saying why."""
        if backend not in STEP_BACKENDS:
            raise ValueError(f"step backend {backend!r}: expected one of {', '.join(STEP_BACKENDS)}")
        if backend == "compile":
            self._require_covered()
        self._compile = backend == "compile"

    def compile(self, batch_size: int = 1) -> None:
        """Compile the ``"compile"`` backend's step now, without switching to it;
        ``set_backend("compile")`` then takes it at once. Safe in another thread while this runner
        steps eagerly. ``ValueError`` as ``set_backend``; Inductor's own errors when compiling fails
        (no C++ compiler, ...)."""
        self._require_covered()
        model, p = self.model, next(self.model.parameters())
        with torch.inference_mode():
            x = torch.zeros(batch_size, model.config.chunk, model.config.input_dim, device=p.device, dtype=p.dtype)
            step = self._compiled_step()
            _, state = step(model, self.weights(), x, model.init_state(batch_size))
            step(model, self.weights(), x, state)  # from a carried state too: nothing left to compile

    def applies(self) -> bool:
        """Whether a step now takes the fast (or compiled) step: a covered model, in eval mode,
        autograd off."""
        return self._covered and not self.model.training and not torch.is_grad_enabled()

    def weights(self) -> Weights:
        """The model's weights as the fast step reads them, gathered again after any change (cached
        while autograd is off)."""
        return self._weights.get([d[name] for d, name in self._slots])  # ~130 for the paper model

    def step(self, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """x (B, chunk, I) -> (y (B, W), new state), as ``model.step_chunk`` (its shape checks too)."""
        model = self.model
        if not self.applies():
            return model.step_chunk(x, state)
        model.check_chunk(x, state)
        w = self.weights()
        if self._compile and torch.is_inference_mode_enabled():  # the mode the compiled graph is made for
            out = self._run_compiled(w, x, state)
            if out is not None:
                return out
        return _advance_fast(model, w, x, state)

    def _require_covered(self) -> None:
        reason = self.uncovered(self.model.config)
        if reason:
            raise ValueError(f"step backend 'compile' does not apply to this model: {reason}")

    def _compiled_step(self) -> Any:
        if self._compiled is None:
            self._compiled = compile_fast(_advance_fast)
        return self._compiled

    def _run_compiled(self, w: Weights, x: Tensor, state: StreamState) -> tuple[Tensor, StreamState] | None:
        """The compiled step; None once torch's recompile limit is reached (a variant per
        architecture, batch size, dtype and device, 8 by default in a process): this runner then
        steps eagerly from now on, with a warning."""
        from torch._dynamo.exc import FailOnRecompileLimitHit  # loaded with the compiler already

        try:
            return self._compiled_step()(self.model, w, x, state)
        except FailOnRecompileLimitHit as exc:
            self._compile = False
            reason = (str(exc).strip().splitlines() or [""])[0]
            warnings.warn(f"compiled step given up for this model ({reason}); it steps eagerly from now on "
                          "(raise torch._dynamo.config.recompile_limit for more compiled variants)",
                          RuntimeWarning, stacklevel=3)
            return None

