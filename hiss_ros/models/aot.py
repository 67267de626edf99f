"""The compiled step: the fast step (``hiss_ros.models.streaming.step`` through ``HiSS._advance``)
compiled ahead of time by AOTInductor (``torch.export`` + ``torch._inductor.aoti_compile_and_package``)
into a shared library, kept in an on-disk cache and called without Python in between.

Why ahead of time: at batch 1 a step is per-operation overhead. Compiled, the contact model's step
costs ~50 us back to back and ~0.4 ms after idle, against ~0.3 and ~1.1 ms eagerly on the benchmark
CPU (and ``torch.compile``'s runtime wrappers in Python cost most of what its kernels saved after idle).

A package is compiled once per architecture (the model config), batch size, dtype, device, torch
thread count (on the CPU), torch version and source of the step, and cached under ``cache_dir()``
(written atomically: compiled into a temporary name, then renamed), so later runs load it in well
under a second; a package no process has compiled or loaded for 30 days is removed at the next
compile. Compiling takes ~10-30 s on 2 cores and needs a C++ compiler. The weights are inputs of the
compiled graph, not constants, and so are the model's buffers (``delta_std``): new weights (a hot
reload, an optimizer step) need no new compile. While it traces (~2 s), ``torch.export`` switches
process-wide settings (oneDNN off): a model stepping in another thread meanwhile may differ in its
last bits (seen: 3.6e-7).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections import namedtuple
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from hiss_ros.models.config import config_to_dict
from hiss_ros.models.hiss import StreamState
from hiss_ros.models.streaming import step

CACHE_ENV = "HISS_ROS_CACHE"
# torch's own deprecation, raised from inside its export and packaging: nothing a user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# The modules whose code the compiled step is made of: a change to any of them compiles anew.
_SOURCES = ("streaming", "hiss", "mamba", "scan", "s4d", "blocks", "aot")
UNUSED_FOR_S = 30 * 86400  # a cached package neither compiled nor loaded for this long goes at the next compile
_LOCK = threading.Lock()  # one compile at a time in a process (Inductor's state is global)


def cache_dir() -> Path:
    """Where compiled steps are kept: ``$HISS_ROS_CACHE``, else ``$XDG_CACHE_HOME/hiss_ros``, else
    ``~/.cache/hiss_ros``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hiss_ros"


def _source_digest() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()


def _hardware(device: torch.device) -> str:
    """What the generated code is made for besides torch: the CPU (Inductor compiles for this
    machine's instruction set: a package built with AVX-512 dies with SIGILL on a CPU without it,
    which no fallback can catch, so a cache shared between machines must not mix them) and, on CUDA,
    the GPU's compute capability."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    cpu = platform.machine()
    try:  # the model and its flags, where Linux says (a shared home directory may span CPU generations)
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        cpu += hashlib.sha256("".join(sorted(line for line in info.splitlines()
                                             if line.startswith(("model name", "flags")))).encode()).hexdigest()[:16]
    except OSError:
        pass
    gpu = f" sm{''.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else ""
    return f"{cpu} {pick_vec_isa()}{gpu}"


def _prune(folder: Path, now: float | None = None) -> None:
    """Before a compile: remove the temporaries of a process that ended while compiling (older than
    an hour), and packages no process has compiled or loaded for ``UNUSED_FOR_S`` with their ``.json``
    (a torch upgrade or a change of the step's source leaves the old ones behind, ~2 MB each)."""
    now = time.time() if now is None else now
    for f in folder.iterdir():
        if f.name.startswith(".compiling-"):
            limit = 3600
        elif f.suffix == ".pt2" and not f.name.startswith("."):
            limit = UNUSED_FOR_S
        else:
            continue
        try:
            if now - f.stat().st_mtime > limit:
                f.unlink()
                if f.suffix == ".pt2" and not f.name.startswith("."):
                    f.with_suffix(".json").unlink(missing_ok=True)
        except FileNotFoundError:  # renamed or removed by another process meanwhile
            pass


class _Advance(nn.Module):
    """(x, state leaves, weight tensors) -> (y, *new state leaves): the fast step on flat tensors."""

    def __init__(self, model: nn.Module, state_spec: Any, weights: list[Any], weights_spec: Any) -> None:
        super().__init__()
        self.model, self.state_spec, self.weights_spec = model, state_spec, weights_spec
        self.static = {i: w for i, w in enumerate(weights) if not isinstance(w, Tensor)}  # layer-norm eps

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        tensors = iter(weights)
        leaves = [self.static[i] if i in self.static else next(tensors) for i in range(self.weights_spec.num_leaves)]
        w = pytree.tree_unflatten(leaves, self.weights_spec)
        y, new = self.model._advance(x, pytree.tree_unflatten(list(state), self.state_spec), partial(step, w))
        # contiguous: the state goes back in as the next step's input, which the package reads with the
        # strides it was compiled for (a view such as the conv window's last taps would be misread)
        return (y, *(t.contiguous() for t in pytree.tree_leaves(new)))


class _Step(nn.Module):
    """What is exported: (x, *state, *weights, *buffers) -> (y, *new state), flat tensors. The
    model's buffers (``delta_std``) are inputs too, as the weights are: the package holds no values."""

    def __init__(self, advance: _Advance, n_state: int, n_weights: int) -> None:
        super().__init__()
        self.advance, self.n_state, self.n_weights = advance, n_state, n_weights
        self.buffer_names = [f"model.{name}" for name, _ in advance.model.named_buffers()]

    def forward(self, x: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        n, m = self.n_state, self.n_state + self.n_weights
        buffers = dict(zip(self.buffer_names, rest[m:], strict=True))
        return torch.func.functional_call(self.advance, buffers, (x, rest[:n], rest[n:m]))


def step_inputs(model: nn.Module, weights: Any) -> list[Tensor]:
    """What the compiled step reads besides the chunk and the state: the gathered weights' tensors
    (each contiguous) and the model's buffers, in its order."""
    return [*(w.contiguous() for w in pytree.tree_leaves(weights) if isinstance(w, Tensor)), *model.buffers()]


class CompiledStep:
    """One compiled package: ``step(x, state, inputs) -> (y, state)`` for one batch size, dtype and
    device; ``inputs``: ``step_inputs`` of the model and its gathered weights."""

    def __init__(self, path: Path, state_spec: Any, example: Tensor, state: list[Tensor]) -> None:
        self.path, self.state_spec = path, state_spec
        self.dtype, self.device = example.dtype, example.device
        self._state_types = [(t.dtype, t.device) for t in state]
        index = example.device.index if example.device.type == "cuda" and example.device.index is not None else -1
        self._package = torch._inductor.aoti_load_package(str(path), device_index=index)
        self._run = self._package.loader.run  # flat tensors in, flat tensors out: no Python wrapper per call
        self._build = _builder(state_spec)
        self._last: tuple[Any, list[Tensor]] = (None, [])  # the state it returned last, and its leaves

    def __call__(self, x: Tensor, state: StreamState, inputs: list[Tensor]) -> tuple[Tensor, StreamState]:
        last, leaves = self._last
        if state is not last:  # a state of its own is passed back as it was returned: no flattening
            leaves = [t.contiguous() for t in pytree.tree_leaves(state)]
            self._check([(t.dtype, t.device) for t in leaves] != self._state_types, "state", state)
        self._check(x.dtype != self.dtype or x.device != self.device, "chunk", x)
        out = self._run([x.contiguous(), *leaves, *inputs])
        new = self._build(out, 1)
        self._last = (new, out[1:])
        return out[0], new


    def _check(self, wrong: bool, what: str, got: Any) -> None:
        """The package reads raw memory as the dtype and device it was compiled for: anything else
        is refused, as the eager step refuses it, instead of being misread."""
        if wrong:
            got = [(t.dtype, t.device) for t in pytree.tree_leaves(got)]
            raise ValueError(f"compiled step for {self.dtype} on {self.device}: the {what} is {got} "
                             "(convert it, or step a model of that dtype and device)")


def _builder(spec: Any) -> Any:
    """``build(leaves, start) -> the pytree of spec`` from ``leaves[start:]``, for the NamedTuples and
    tuples of a state; the same as ``pytree.tree_unflatten``, at a fraction of its cost per call."""
    if spec.is_leaf():
        return lambda leaves, i: leaves[i]
    children, offsets, n = [], [], 0
    for child in spec.children():
        children.append(_builder(child))
        offsets.append(n)
        n += child.num_leaves
    parts = list(zip(children, offsets, strict=True))
    if spec.type is tuple:
        return lambda leaves, i: tuple([b(leaves, i + o) for b, o in parts])
    if spec.type is namedtuple:  # pytree's node for every NamedTuple: the class is its context
        kind = spec.context
        return lambda leaves, i: kind(*[b(leaves, i + o) for b, o in parts])
    return lambda leaves, i: pytree.tree_unflatten(leaves[i:i + spec.num_leaves], spec)


def threads_compiled_for(device: torch.device) -> int:
    """The torch thread count a compiled step is made for: on the CPU its parallel loops are compiled for
    the current count; on CUDA none (0), as its kernels are the GPU's."""
    return torch.get_num_threads() if device.type == "cpu" else 0


def compiled_step(model: nn.Module, weights: Any, batch_size: int,
                  progress: Callable[[str], object] | None = None) -> CompiledStep:
    """The compiled step of ``model`` (eval, a model ``StepRunner`` covers) for ``batch_size``:
    loaded from the cache, or compiled and cached (``progress(message)`` is told first)."""
    p = next(model.parameters())
    state = model.init_state(batch_size)
    leaves, state_spec = pytree.tree_flatten(state)
    w_leaves, w_spec = pytree.tree_flatten(weights)
    key = json.dumps({
        "config": config_to_dict(model.config), "batch": batch_size, "dtype": str(p.dtype), "device": str(p.device),
        "hardware": _hardware(p.device), "threads": threads_compiled_for(p.device), "torch": torch.__version__,
        "code": _source_digest(),
        "weights": [list(w.shape) if isinstance(w, Tensor) else w for w in w_leaves],
    }, sort_keys=True, default=str)
    path = cache_dir() / "steps" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt2"
    x = torch.zeros(batch_size, model.config.chunk, model.config.input_dim, device=p.device, dtype=p.dtype)
    with _LOCK:
        if path.exists():
            try:
                loaded = CompiledStep(path, state_spec, x, leaves)
            except Exception:  # unreadable (another torch build's?): compile it again
                path.unlink(missing_ok=True)
            else:
                with contextlib.suppress(OSError):  # in use: kept by _prune (a read-only cache stays as it is)
                    os.utime(path)
                return loaded
        if progress is not None:
            progress(f"compiling the step (AOTInductor) into {path}")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # shared libraries this user will load
        _prune(path.parent)
        example = tuple(t.clone() for t in (x, *leaves, *step_inputs(model, weights)))
        n_weights = sum(isinstance(w, Tensor) for w in w_leaves)
        # Traced on a copy: the trace swaps the buffers of the model it runs, which may be stepping meanwhile.
        module = _Step(_Advance(copy.deepcopy(model), state_spec, w_leaves, w_spec), len(leaves), n_weights)
        with torch.no_grad():
            program = torch.export.export(module, example, strict=False)
            fd, tmp = tempfile.mkstemp(prefix=".compiling-", suffix=".pt2", dir=path.parent)
            os.close(fd)
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
                os.replace(tmp, path)  # atomic: a reader sees the whole package or none
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        (path.parent / f"{path.stem}.json").write_text(key)  # what it was compiled for (for people)
        return CompiledStep(path, state_spec, x, leaves)
