"""Serving: a checkpoint in, physical-unit estimates out, one sample at a time. No ROS.

    est = StreamingEstimator.from_checkpoint("contact")          # a path, or a shipped model's name
    for stream, stamp_ns, values in samples:                     # stream: index into est.spec.inputs
        for e in est.push(stream, stamp_ns, values):
            print(e.stamp_ns, e.values)                          # (O,) float64, physical units
            print(e.variance)                                    # (O,) or None: see Estimate

The estimator node, ``hiss-eval``, the demo and the benchmarks all serve through this class, and
the trainer writes what it reads (``ServingSpec``, stored in the checkpoint by ``save_model``):
the streams, rates, chunk, filter and gap limit (a ``PipelineConfig``), the ``Normalization`` of
inputs and outputs, and the validation error. ``push`` runs the trainer's own ``Pipeline`` (same
sample hygiene, resampling, filter, chunking, normalisation), advances the model one step per
completed chunk (through its ``StepRunner``: the fast or the compiled step) with its state carried
(O(chunk) per estimate however long it has run), restarts from a fresh state when the input breaks
(gap, time jumping back), and de-normalises. A model with the variance head (``variance: true``)
also gives each estimate's per-channel variance, de-normalised, scaled by the calibration fitted
after training (``ServingSpec.variance_scale``) and raised on input unlike the training data
(``ServingSpec.novelty``, whose score every estimate of every model carries). A non-finite model
output (mean or variance) is never returned: the state is reset and it is counted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hiss_ros.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from hiss_ros.data.streams import StreamSpec
from hiss_ros.errors import CheckpointError, ConfigError, HissError
from hiss_ros.models import ChunkedModel, StepRunner
from hiss_ros.pipeline import Chunk, Normalization, Pipeline, PipelineConfig
from hiss_ros.pipeline.novelty import Novelty
from hiss_ros.shipped import shipped_model


@dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that serving a model needs, stored in its checkpoint."""

    inputs: tuple[StreamSpec, ...]  # stream 0 drives the input clock
    outputs: tuple[StreamSpec, ...]
    pipeline: PipelineConfig  # channels per input, rates (so the chunk), gap limit, filter
    normalization: Normalization
    validation_mse: tuple[float, ...] | None = None  # per output channel, physical units
    # Per output channel, the factor on the variance head's variance that made mean(z^2) = 1 on the
    # validation data (z = error / predicted std); None: not calibrated (1), or no variance head.
    variance_scale: tuple[float, ...] | None = None
    # Measured in the training bags, per input: where the stamps came from (header | receive), and
    # the rate (Hz); None: not recorded (a checkpoint of an older trainer).
    input_stamps: tuple[str, ...] | None = None
    input_rates_hz: tuple[float, ...] | None = None
    # Statistics of the training chunks: each estimate's novelty score, and with its ``inflate``
    # the variance raised on novel input (hiss_ros.pipeline.novelty); None: an older trainer's.
    novelty: Novelty | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.pipeline.input_dims):
            raise ConfigError(f"serving spec: {len(self.inputs)} input streams, but input_dims "
                              f"{list(self.pipeline.input_dims)}")
        n_in, n_out = self.normalization.input_mean.size, self.normalization.output_mean.size
        if n_in != self.pipeline.channels:
            raise ConfigError(f"serving spec: input normalisation has {n_in} channels, the inputs have "
                              f"{self.pipeline.channels} ({list(self.pipeline.input_dims)})")
        named = len(self.output_channels)
        if n_out != named:
            raise ConfigError(f"serving spec: output normalisation has {n_out} channels, the outputs name {named}")
        if self.validation_mse is not None and len(self.validation_mse) != n_out:
            raise ConfigError(f"serving spec: validation error has {len(self.validation_mse)} channels, "
                              f"the outputs {n_out}")
        scale = self.variance_scale
        if scale is not None and (len(scale) != n_out or not all(math.isfinite(v) and v > 0 for v in scale)):
            raise ConfigError(f"serving spec: variance_scale = {list(scale)}: expected {n_out} finite positive "
                              f"numbers, one per output channel")
        n = len(self.inputs)
        if self.input_stamps is not None and (len(self.input_stamps) != n
                                              or not set(self.input_stamps) <= {"header", "receive"}):
            raise ConfigError(f"serving spec: input_stamps = {list(self.input_stamps)}: expected header or "
                              f"receive for each of the {n} inputs")
        rates = self.input_rates_hz
        if rates is not None and (len(rates) != n or not all(math.isfinite(r) and r > 0 for r in rates)):
            raise ConfigError(f"serving spec: input_rates_hz = {list(rates)}: expected {n} positive rates")
        if self.novelty is not None and self.novelty.channels != self.pipeline.channels:
            raise ConfigError(f"serving spec: novelty statistics of {self.novelty.channels} input channels, "
                              f"the pipeline has {self.pipeline.channels}")

    @property
    def output_channels(self) -> list[str]:
        """``topic:channel`` per output channel, in model order."""
        return [f"{s.topic}:{c}" for s in self.outputs for c in s.channel_names]

    def physical_variance(self, log_var: np.ndarray, x: np.ndarray, score: np.ndarray | None = None) -> np.ndarray:
        """The variance head's output (..., O), a log-variance in normalised units, for the chunks
        x (..., chunk, C) it was predicted from -> float64 variance in physical units squared,
        calibrated by ``variance_scale`` and raised on novel input (``novelty.inflate``); ``score``:
        the chunks' novelty scores, where the caller has them already."""
        scale = np.asarray(self.variance_scale or 1.0)
        with np.errstate(over="ignore"):  # an overflow is an inf: serving refuses it as non-finite
            variance = np.exp(log_var.astype(np.float64)) * self.normalization.output_std ** 2 * scale
        if self.novelty is None:
            return variance
        return variance * self.novelty.factor(self.novelty.score(x) if score is None else score)[..., None]

    def expected_rates_hz(self) -> list[float | None]:
        """Per input, the rate its samples should come at: measured in the training bags, else the
        stream's declared ``rate_hz`` (the clock stream's default is the input rate); None:
        unknown (a checkpoint of an older trainer), not checked."""
        if self.input_rates_hz:
            return list(self.input_rates_hz)
        return [s.rate_hz or (self.pipeline.input_rate_hz if i == 0 else None) for i, s in enumerate(self.inputs)]

    def same_streams(self, other: ServingSpec) -> bool:
        """Whether ``other`` reads and writes the same streams in the same way (hot reload)."""
        def read(specs: tuple[StreamSpec, ...]) -> list[dict[str, Any]]:
            return [s.as_read() for s in specs]

        stamps = None not in (self.input_stamps, other.input_stamps) and self.input_stamps != other.input_stamps
        return not stamps and (read(self.inputs), read(self.outputs), self.pipeline) == (
            read(other.inputs), read(other.outputs), other.pipeline)

    def describe(self) -> str:
        stamps = f", stamped by {list(self.input_stamps)}" if self.input_stamps else ""
        return (f"inputs {[s.to_dict() for s in self.inputs]}, outputs {[s.to_dict() for s in self.outputs]} "
                f"at {self.pipeline}{stamps}")

    # --- stored form: the checkpoint's ``data`` and ``normalization`` metadata ---------------

    def data(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
            "input_dims": list(p.input_dims), "input_rate_hz": p.input_rate_hz, "output_rate_hz": p.output_rate_hz,
            "max_gap_s": p.max_gap_s, "filter": dataclasses.asdict(p.filter) if p.filter else None,
            **({"strapdown": p.strapdown.to_dict()} if p.strapdown else {}),
            **({"validation": {"mse_per_channel": list(self.validation_mse)}} if self.validation_mse else {}),
            **({"variance_scale": list(self.variance_scale)} if self.variance_scale else {}),
            **({"input_stamps": list(self.input_stamps)} if self.input_stamps else {}),
            **({"input_rates_hz": list(self.input_rates_hz)} if self.input_rates_hz else {}),
            **({"novelty": self.novelty.to_dict()} if self.novelty else {}),
        }

    @classmethod
    def from_metadata(cls, data: Any, normalization: Any) -> ServingSpec:
        """The spec from a checkpoint's metadata; ConfigError naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise ConfigError(f"data spec: expected a mapping, got {type(data).__name__}")
        missing = [k for k in ("inputs", "outputs", "input_dims", "input_rate_hz", "output_rate_hz") if k not in data]
        if missing:
            raise ConfigError(f"data spec: missing {missing} (made by an older or another trainer?)")
        for key in ("inputs", "outputs"):
            if not isinstance(data[key], list) or not data[key]:
                raise ConfigError(f"data spec: {key} must be a non-empty list of streams")
        if not isinstance(data.get("validation") or {}, dict):
            raise ConfigError(f"data spec: validation = {data['validation']!r}: expected a mapping")
        validation = (data.get("validation") or {}).get("mse_per_channel")
        if validation is not None and (not isinstance(validation, list)
                                       or not all(isinstance(v, (int, float)) for v in validation)):
            raise ConfigError(f"data spec: validation.mse_per_channel = {validation!r}: expected a list of numbers")
        scale = data.get("variance_scale")
        if scale is not None and (not isinstance(scale, list)
                                  or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)):
            raise ConfigError(f"data spec: variance_scale = {scale!r}: expected a list of numbers")
        stamps, rates = data.get("input_stamps"), data.get("input_rates_hz")
        if stamps is not None and (not isinstance(stamps, list) or not all(isinstance(v, str) for v in stamps)):
            raise ConfigError(f"data spec: input_stamps = {stamps!r}: expected a list of header / receive")
        if rates is not None and (not isinstance(rates, list)
                                  or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rates)):
            raise ConfigError(f"data spec: input_rates_hz = {rates!r}: expected a list of numbers")
        dims = data["input_dims"]
        novelty = data.get("novelty")
        return cls(
            tuple(StreamSpec.from_dict(s) for s in data["inputs"]),
            tuple(StreamSpec.from_dict(s) for s in data["outputs"]),
            PipelineConfig(tuple(dims) if isinstance(dims, list) else dims, data["input_rate_hz"],
                           data["output_rate_hz"], data.get("max_gap_s", 0.5),
                           data.get("filter"), data.get("strapdown")),
            Normalization.from_dict(normalization),
            None if validation is None else tuple(float(v) for v in validation),
            None if scale is None else tuple(float(v) for v in scale),
            None if stamps is None else tuple(stamps),
            None if rates is None else tuple(float(v) for v in rates),
            None if novelty is None else Novelty.from_dict(novelty),
        )


def save_model(path: str | os.PathLike, model: ChunkedModel, spec: ServingSpec,
               extra: dict[str, Any] | None = None) -> Path:
    """The one way a model is written for serving: weights, model config and ``spec``, with
    ``extra`` data keys beside it (the trainer's settings, so hiss-eval rebuilds its split)."""
    return save_checkpoint(path, model, spec.normalization.to_dict(), {**spec.data(), **(extra or {})})


class Loaded(NamedTuple):
    path: str
    model: ChunkedModel
    spec: ServingSpec
    data: dict[str, Any]  # the checkpoint's whole data metadata (serving spec and anything else)


def load_model(path_or_name: str | os.PathLike) -> Loaded:
    """A checkpoint (or shipped model name) with its serving spec, checked against the model:
    CheckpointError, one line, for anything that would not serve."""
    if not str(path_or_name):
        raise CheckpointError("no model given: a checkpoint (model.safetensors from hiss-train) or the name of a "
                              "shipped model (contact, broad_velocity)")
    path = shipped_model(str(path_or_name))
    if path.is_dir():  # a hiss-train output folder
        path = path / MODEL_FILE
    ckpt = load_checkpoint(path)
    try:
        spec = ServingSpec.from_metadata(ckpt.data, ckpt.normalization)
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot be served: {exc}") from None
    cfg = ckpt.config
    expected = (spec.pipeline.channels, spec.normalization.output_mean.size, spec.pipeline.chunk)
    if (cfg.input_dim, cfg.output_dim, cfg.chunk) != expected:
        raise CheckpointError(f"{path}: the model takes {cfg.input_dim} channels in chunks of {cfg.chunk} and gives "
                              f"{cfg.output_dim}, its serving spec says {expected[0]}, {expected[2]} and {expected[1]}")
    if spec.variance_scale is not None and not cfg.variance:
        raise CheckpointError(f"{path}: its serving spec has a variance_scale, but the model has no variance head "
                              "(model.variance false): re-export it with hiss-train")
    return Loaded(str(path), ckpt.model, spec, ckpt.data)


def resolve_device(choice: str) -> str:
    """``auto``: CUDA when torch sees a device, else CPU; ``cuda`` without one is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise HissError(f"device {choice!r}: expected auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise HissError("device cuda, but torch sees no CUDA device")
    return "cuda" if choice in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


class Estimate(NamedTuple):
    stamp_ns: int  # the time of the chunk's last input sample
    values: np.ndarray  # (O,) float64, physical units, in ``spec.output_channels`` order
    # (O,) float64, the variance of each value in physical units squared (calibrated: see
    # ``ServingSpec.variance_scale``, raised on novel input); None for a model without the variance head.
    variance: np.ndarray | None = None
    # How unlike the training chunks its input chunk is (1: typical; hiss_ros.pipeline.novelty);
    # None for a checkpoint without the statistics.
    novelty: float | None = None


class StreamingEstimator:
    """A model and its serving spec, streaming: ``push`` samples, get estimates."""

    def __init__(self, model: ChunkedModel, spec: ServingSpec, device: str = "cpu", path: str = "",
                 max_gap_s: float | None = None) -> None:
        self.path, self.spec, self.device = path, spec, device
        self.model = model.to(device).eval()
        self.runner = StepRunner(self.model)  # how it steps: eager, or compiled by ``compile``
        pipe_cfg = spec.pipeline if not max_gap_s else dataclasses.replace(spec.pipeline, max_gap_s=max_gap_s)
        self.pipeline = Pipeline(pipe_cfg, spec.normalization)
        self.counters: Counter[str] = self.pipeline.counters  # pipeline, resets, estimates, nonfinite_output
        self.step_seconds: deque[float] = deque(maxlen=1000)  # the model step alone, last 1,000 estimates
        self.step_cpu_ns = 0  # this thread's CPU time in the last step (preemption not counted)
        # Whether every estimate carries its input's novelty score (``Estimate.novelty``); False: only
        # where its variance needs it (the variance head), for a caller that scores the chunks itself
        # in batches (the node's diagnostics: about 60 us an estimate on cold caches, saved).
        self.score_novelty = True
        self.reset()

    @classmethod
    def from_checkpoint(cls, path_or_name: str | os.PathLike, device: str = "cpu",
                        max_gap_s: float | None = None) -> StreamingEstimator:
        """Load, check and warm up; CheckpointError for a checkpoint that would not serve, one that
        gives non-finite outputs included."""
        loaded = load_model(path_or_name)
        est = cls(loaded.model, loaded.spec, device, loaded.path, max_gap_s)
        est.warm_up()
        return est

    @property
    def predicts_variance(self) -> bool:
        """Whether each estimate comes with its own predicted variance (a model with a variance head)."""
        return bool(getattr(self.model.config, "variance", False))

    def reset(self) -> None:
        """A fresh model state from the next chunk on."""
        self.state = self.model.init_state(1)
        self.episode = self.pipeline.episode

    def restart(self, reason: str = "restart") -> None:
        """Forget the stream: the pipeline's partial chunk and held samples, and the model state."""
        self.pipeline.restart(reason)
        self.reset()

    def warm_up(self) -> None:
        """Two steps on zeros (from a fresh and a carried state), so the first real estimate pays
        no lazy initialisation; a model whose output is not finite is refused."""
        cfg = self.model.config
        with torch.inference_mode():
            x = torch.zeros(1, cfg.chunk, cfg.input_dim, device=self.device)
            y, state = self.runner.step(x, self.model.init_state(1))
            y2, _ = self.runner.step(x, state)
        if not (torch.isfinite(y).all() and torch.isfinite(y2).all()):
            raise CheckpointError(f"{self.path}: the model gives non-finite outputs on zero input (corrupt weights?)")

    def compile(self, progress: Callable[[str], object] | None = None) -> str:
        """Compile the streaming step (the runner's ``compile`` backend) and switch to it; the outcome for
        diagnostics, ``in use (...)`` or ``failed (...)``: a model the compiled step does not cover, or a
        compile that fails (no C++ compiler, ...), keeps the eager step. Safe in another thread
        while ``push`` steps eagerly (the switch is one attribute); ``progress(message)`` is told
        before a compile that the cache does not hold."""
        began = time.monotonic()
        try:
            self.runner.compile(progress=progress)
        except Exception as exc:  # ValueError (not covered); Inductor fails in many ways
            return f"failed ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]})"
        self.runner.set_backend("compile")
        return f"in use ({time.monotonic() - began:.1f} s to compile, or to load from the cache)"

    def push(self, stream: int, stamp_ns: int, values: Any) -> list[Estimate]:
        """One sample of input ``stream`` -> the estimates it completed (usually none or one)."""
        return [e for chunk in self.pipeline.push(stream, stamp_ns, values) if (e := self.estimate(chunk))]

    def follow_episode(self, chunk: Chunk) -> None:
        """A chunk of a new episode (the input broke: gap, clock jump) starts from a fresh state."""
        if chunk.episode != self.episode:
            self.reset()
            self.episode = chunk.episode
            self.counters["resets"] += 1

    def estimate(self, chunk: Chunk) -> Estimate | None:
        """Advance the model over one pipeline chunk; None (counted) if its output is not finite."""
        self.follow_episode(chunk)
        x = torch.from_numpy(chunk.x)[None]
        if self.device != "cpu":
            x = x.to(self.device)
        began, cpu = time.perf_counter(), time.thread_time_ns()
        with torch.inference_mode():
            y, self.state = self.runner.step(x, self.state)
        self.step_cpu_ns = time.thread_time_ns() - cpu
        self.step_seconds.append(time.perf_counter() - began)
        return self.to_estimate(chunk.stamp_ns, y[0], chunk.x)

    def to_estimate(self, stamp_ns: int, y: torch.Tensor, x: np.ndarray) -> Estimate | None:
        """One model output y (W,) for the chunk x (chunk, C) -> the estimate in physical units;
        None (counted, the state reset) if its mean or variance is not finite."""
        mean, log_var = self.model.split_output(y)  # (O,) each, log_var None without the variance head
        floats = self.spec.normalization.physical_floats(mean.tolist())  # no numpy call: cheaper on cold caches
        values, finite = np.array(floats), all(map(math.isfinite, floats))
        score = None
        if self.spec.novelty is not None and (self.score_novelty or log_var is not None):
            score = self.spec.novelty.score(x)
        variance = None if log_var is None else self.spec.physical_variance(log_var.cpu().numpy(), x, score)
        novelty = None if score is None else float(score)
        if not finite or (variance is not None and not np.isfinite(variance).all()):
            self.counters["nonfinite_output"] += 1
            self.reset()
            return None
        self.counters["estimates"] += 1
        return Estimate(stamp_ns, values, variance, novelty)
