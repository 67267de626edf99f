"""Bags -> pipeline chunks + causal targets -> train / validation splits with normalisation.

Target of chunk k = ground truth interpolated at the chunk's stamp (its last input sample): the
estimate and the truth refer to the same instant, no look-ahead. Chunks whose stamp is outside
an output stream's recorded span, or more than ``max_gap_s`` away from its nearest sample, get
no target and split their episode into segments.

Split by time: the first (1 - val_fraction) of each segment trains, the rest validates (never
shuffled windows); normalisation statistics come from the training part only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hiss_ros.data import StreamData, read_streams
from hiss_ros.data.streams import StreamSpec, measured_rate_hz
from hiss_ros.errors import ConfigError, HissError
from hiss_ros.pipeline import Normalization, Pipeline
from hiss_ros.pipeline.core import safe_std
from hiss_ros.pipeline.strapdown import CHANNELS as STRAPDOWN_CHANNELS
from hiss_ros.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Split:
    x: list[np.ndarray] = field(default_factory=list)  # per segment (K, chunk, C): float64 raw / float32 normalised
    y: list[np.ndarray] = field(default_factory=list)  # per segment (K, O) float32
    stamps: list[np.ndarray] = field(default_factory=list)  # per segment (K,) int64, chunk times

    @property
    def chunks(self) -> int:
        return sum(len(y) for y in self.y)


@dataclass
class Dataset:
    train: Split
    val: Split
    input_dims: tuple[int, ...]
    output_dim: int
    chunk: int
    normalization: Normalization
    skipped_segments: int = 0
    pipeline_counters: dict[str, int] = field(default_factory=dict)
    input_stamps: tuple[str, ...] | None = None  # per input: header | receive, as read from the bags
    input_rates_hz: tuple[float, ...] | None = None  # per input, measured over the training bags
    whole_val_bags: bool = False  # validation: every segment of independent bags (--val-bag), whole


def _targets(cfg: TrainConfig, outputs: Sequence[StreamData], stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, O) ground truth at ``stamps`` and a (K,) mask of where it is defined; ``outputs``: one
    stream per output spec (two may share a topic: each has its own fields' values)."""
    cols, ok = [], np.ones(len(stamps), bool)
    gap = cfg.max_gap_s * 1e9
    for stream in outputs:
        t, v = stream.stamps_ns, stream.values
        i = np.clip(np.searchsorted(t, stamps), 1, len(t) - 1)
        nearest = np.minimum(np.abs(t[i] - stamps), np.abs(t[i - 1] - stamps))
        ok &= (stamps >= t[0]) & (stamps <= t[-1]) & (nearest <= gap)
        cols += [np.interp(stamps, t, v[:, c]) for c in range(v.shape[1])]
    return np.stack(cols, axis=1), ok


def _segments(mask: np.ndarray) -> list[slice]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@dataclass
class Segments:
    """Un-normalised chunks and targets, split in time into training and validation parts."""

    train: Split
    val: Split
    input_dims: tuple[int, ...]
    chunk: int
    skipped: int
    counters: dict[str, int]
    input_stamps: tuple[str, ...] | None = None
    input_rates_hz: tuple[float, ...] | None = None
    chunks_read: int = 0  # the pipeline's chunks, with a target or not
    chunks_with_target: int = 0
    spans_ns: dict[str, tuple[int, int]] = field(default_factory=dict)  # per stream, its first and last stamp


class Rates:
    """Each input's measured rate, checked bag by bag against the rate it is expected at (its
    ``rate_hz``, else ``input_rate_hz``): a 30 Hz IMU configured as 50 Hz would be resampled onto
    the wrong time scale and trained silently, so a mismatch beyond ``rate_tolerance`` is refused
    (ConfigError naming both rates), or with ``allow_rate_mismatch`` a warning."""

    def __init__(self, cfg: TrainConfig, expected: Sequence[float | None] | None = None) -> None:
        """``expected``: per input, the rate to check against (None: not checked), instead of the
        config's (hiss-eval: the rates a checkpoint was trained at)."""
        self.cfg, self.trained = cfg, expected is not None
        self.expected = list(expected) if expected is not None else [
            s.rate_hz or cfg.input_rate_hz for s in cfg.inputs]
        self.intervals, self.seconds = [0.0] * len(cfg.inputs), [0.0] * len(cfg.inputs)

    def check(self, bag: str | Path, inputs: Sequence[StreamData]) -> None:
        """``inputs``: one stream per input spec, of one time line of ``bag``."""
        cfg = self.cfg
        for i, spec in enumerate(cfg.inputs):
            measured = measured_rate_hz(inputs[i].stamps_ns, cfg.max_gap_s)
            if measured is None:
                continue
            rate, seconds = measured
            self.intervals[i] += rate * seconds
            self.seconds[i] += seconds
            expected = self.expected[i]
            if expected is None or abs(rate / expected - 1) <= cfg.rate_tolerance:
                continue
            if self.trained:
                what = (f"{bag}: {spec.topic} is recorded at {rate:.4g} Hz, but the model was trained at "
                        f"{expected:.4g} Hz")
                fix = "evaluate it on recordings at its rate"
            else:
                whose = f"its rate_hz: {spec.rate_hz:g}" if spec.rate_hz else f"input_rate_hz: {cfg.input_rate_hz:g}"
                what = (f"{bag}: {spec.topic} is recorded at {rate:.4g} Hz, but the config expects {expected:g} Hz "
                        f"({whose})")
                fix = (f"set input_rate_hz: {rate:.4g} (the input clock)" if i == 0 and not spec.rate_hz
                       else f"set rate_hz: {rate:.4g} on the stream")
            what += f", more than {cfg.rate_tolerance:.0%} apart"
            if cfg.allow_rate_mismatch:
                log.warning("%s; going on anyway (allow_rate_mismatch): the time scale is not the one expected", what)
                continue
            raise ConfigError(f"{what}: {fix}, or allow_rate_mismatch: true (--allow-rate-mismatch) to go on anyway")

    @property
    def rates_hz(self) -> tuple[float, ...] | None:
        if not all(self.seconds):
            return None
        return tuple(n / s for n, s in zip(self.intervals, self.seconds, strict=True))


def collect_segments(cfg: TrainConfig, bags: Sequence[str | Path], cache_dir: str | Path | None = None,
                     progress: bool = True, val_fraction: float | None = None,
                     expected_rates: Sequence[float | None] | None = None) -> Segments:
    """Each bag is its own time line (its own pipeline run), or several where its clock stream
    restarts (``read_streams``' ``restart_gap_s``); all their segments are pooled.
    ``val_fraction`` (default ``cfg.train.val_fraction``) of each segment's end validates; 0: none.
    ``expected_rates``: see ``Rates``."""
    frac = cfg.train.val_fraction if val_fraction is None else val_fraction
    train, val = Split(), Split()
    dims: tuple[int, ...] | None = None
    skipped, chunk, counters, read, targeted = 0, 0, {}, 0, 0
    spans: dict[str, tuple[int, int]] = {}
    rates, stamps = Rates(cfg, expected_rates), None
    n_in = len(cfg.inputs)
    for bag in bags:
        # the pipeline's offline ``process`` sorts all samples by stamp: one time line at a time
        data = read_streams([bag], [*cfg.inputs, *cfg.outputs], cache_dir=cache_dir, progress=progress,
                            msg_paths=cfg.msg_paths, restart_gap_s=cfg.max_gap_s)
        bag_stamps = tuple(r.stamp_source for r in data.reports[:n_in])
        if stamps is not None and bag_stamps != stamps:
            log.warning("%s: inputs stamped by %s, the earlier bags' by %s: set stamp: on each stream to make "
                        "them agree", bag, list(bag_stamps), list(stamps))
        stamps = stamps or bag_stamps
        for line in data.timelines:
            rates.check(bag, line[:n_in])
            for spec, stream in zip([*cfg.inputs, *cfg.outputs], line, strict=True):
                lo, hi = spans.get(spec.topic, (stream.stamps_ns[0], stream.stamps_ns[-1]))
                spans[spec.topic] = (min(lo, int(stream.stamps_ns[0])), max(hi, int(stream.stamps_ns[-1])))
            inputs = [(s.stamps_ns, s.values) for s in line[:n_in]]
            bag_dims = tuple(v.shape[1] for _, v in inputs)
            if dims is not None and bag_dims != dims:
                raise HissError(f"{bag}: input channels {bag_dims} differ from the earlier bags' {dims}")
            dims = bag_dims
            pipe = Pipeline(cfg.pipeline_config(dims))
            chunk = pipe.config.chunk
            for ep in pipe.process(inputs):
                y, ok = _targets(cfg, line[n_in:], ep.stamps_ns)
                read, targeted = read + len(ok), targeted + int(ok.sum())
                for seg in _segments(ok):
                    n = seg.stop - seg.start
                    n_val = round(n * frac)
                    if n - n_val < cfg.train.seq_chunks or (n_val < 1 and frac > 0):
                        skipped += 1
                        log.warning("%s: skipping a segment of %d chunks (%.1f s): shorter than one training "
                                    "sequence (%d chunks) plus its validation part", bag, n, n / cfg.output_rate_hz,
                                    cfg.train.seq_chunks)
                        continue
                    cut = seg.start + n - n_val
                    for part, sl in ((train, slice(seg.start, cut)), (val, slice(cut, seg.stop))):
                        if sl.stop == sl.start:  # val_fraction 0: no validation part
                            continue
                        part.x.append(ep.x[sl])
                        part.y.append(y[sl])
                        part.stamps.append(ep.stamps_ns[sl])
            for k, v in pipe.counters.items():
                counters[k] = counters.get(k, 0) + v
    return Segments(train, val, dims or (), chunk, skipped, counters, stamps, rates.rates_hz, read, targeted, spans)


def no_data_error(what: str, cfg: TrainConfig, seg: Segments, bags: Sequence[str | Path]) -> HissError:
    """Why ``bags`` gave no ``what`` (training / validation) data. Where chunks had no target at
    all, or the pipeline made none, the likely cause is streams on different clocks (ground truth
    stamped on wall-clock time, an IMU on its device clock; a stream stamped on receipt): the
    streams' time spans and the pipeline's counters say so. Otherwise the segments are too short."""
    names = ", ".join(map(str, bags))
    if seg.chunks_with_target:
        return HissError(
            f"no {what} data: every segment of {names} is shorter than one training sequence "
            f"({cfg.train.seq_chunks} chunks = {cfg.train.seq_chunks / cfg.output_rate_hz:.1f} s)"
            + (" plus its validation part" if what == "training" else "")
            + "; record longer runs or lower train.seq_chunks")
    spans = "; ".join(f"{'input' if k < len(cfg.inputs) else 'output'} {s.topic} {_span(seg.spans_ns.get(s.topic))}"
                      for k, s in enumerate([*cfg.inputs, *cfg.outputs]))
    counted = ", ".join(f"{k} {v}" for k, v in sorted(seg.counters.items()) if v and k != "accepted")
    why = (f"none of the pipeline's {seg.chunks_read} chunks falls within the outputs' time span" if seg.chunks_read
           else "the pipeline made no chunk")
    return HissError(
        f"no {what} data in {names}: {why}; are the streams on different clocks (e.g. ground truth on "
        f"wall-clock time, the IMU on its device clock)? stamps: {spans}; pipeline counters: {counted or 'none'}; "
        "set stamp: receive on the streams (the bag's receive time, one clock for all) or stamp: header")


def _span(span: tuple[int, int] | None) -> str:
    return "(no sample)" if span is None else f"{span[0] / 1e9:.3f} .. {span[1] / 1e9:.3f} s"


def whole_segments(seg: Segments) -> Split:
    """Each segment's training and validation parts joined again, in time order (the two parts
    of a segment sit at the same index of ``seg.train`` and ``seg.val``)."""
    parts = zip(seg.train.x, seg.val.x, seg.train.y, seg.val.y, seg.train.stamps, seg.val.stamps, strict=True)
    joined = [(np.concatenate([xt, xv]), np.concatenate([yt, yv]), np.concatenate([tt, tv]))
              for xt, xv, yt, yv, tt, tv in parts]
    return Split(*(list(column) for column in zip(*joined, strict=True))) if joined else Split()


def load_dataset(cfg: TrainConfig, bags: Sequence[str | Path], cache_dir: str | Path | None = None,
                 progress: bool = True, val_bags: Sequence[str | Path] = ()) -> Dataset:
    """Segments of ``bags``, normalised with statistics of their training parts. With
    ``val_bags``, ``bags`` train whole and every segment of ``val_bags`` validates: independent
    recordings, where the end of a training recording is neither independent nor typical."""
    seg = collect_segments(cfg, bags, cache_dir, progress, val_fraction=0.0 if val_bags else None)
    if val_bags:
        held_out = collect_segments(cfg, val_bags, cache_dir, progress, val_fraction=0.0)
        if not held_out.train.y:
            raise no_data_error("validation", cfg, held_out, val_bags)
        seg.val = held_out.train
    if not seg.train.y:
        raise no_data_error("training", cfg, seg, bags)
    norm = _fit(cfg, seg, bags)
    return Dataset(normalised(seg.train, norm), normalised(seg.val, norm), seg.input_dims, norm.output_mean.size,
                   seg.chunk, norm, seg.skipped, seg.counters, seg.input_stamps, seg.input_rates_hz,
                   whole_val_bags=bool(val_bags))


def _fit(cfg: TrainConfig, seg: Segments, bags: Sequence[str | Path]) -> Normalization:
    """Normalisation statistics of the training parts; refused, naming the channels, where values
    so large (finite, but beyond ~1e154) that their variance overflows make them meaningless."""
    x = np.concatenate([x.reshape(-1, x.shape[-1]) for x in seg.train.x])
    y = np.concatenate(seg.train.y)
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.concatenate([x.std(0), y.std(0)])
    bad = ~np.isfinite(spread)
    if bad.any():
        derived = list(STRAPDOWN_CHANNELS) if cfg.strapdown is not None else []
        names = _channels(cfg.inputs, seg.input_dims) + derived + _channels(cfg.outputs, (y.shape[1],))
        peak = np.concatenate([np.abs(x).max(0), np.abs(y).max(0)])
        worst = ", ".join(f"{names[k]} up to {peak[k]:.3g}" for k in np.flatnonzero(bad)[:4])
        raise HissError(f"{', '.join(map(str, bags))}: values too large to train on ({worst}): their variance "
                        "overflows; fix the recording or drop those samples")
    return Normalization.fit(x, y)


def _channels(specs: Sequence[StreamSpec], dims: tuple[int, ...]) -> list[str]:
    """A name per channel: ``topic:field`` where each field is one channel, else ``topic[k]``
    (``dims``: channels per stream, or one total when only that is known)."""
    names = [f"{s.topic}:{f}" for s in specs for f in s.channel_names]
    if len(names) == sum(dims):
        return names
    if len(dims) == len(specs):
        return [f"{s.topic}[{k}]" for s, d in zip(specs, dims, strict=True) for k in range(d)]
    return [f"channel {k}" for k in range(sum(dims))]


def normalised(split: Split, norm: Normalization) -> Split:
    """Raw ``split`` in the model's units, by the very function the live pipeline applies."""
    return Split([norm.inputs(x) for x in split.x], [norm.outputs(y) for y in split.y], split.stamps)


def windows(split: Split, seq_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Training windows of ``seq_chunks`` chunks, half-overlapping: x (W, seq*chunk, C), y (W, seq, O)."""
    xs, ys = [], []
    step = max(1, seq_chunks // 2)
    for x, y in zip(split.x, split.y, strict=True):
        for s in range(0, len(y) - seq_chunks + 1, step):
            xs.append(x[s:s + seq_chunks].reshape(-1, x.shape[-1]))
            ys.append(y[s:s + seq_chunks])
    return np.stack(xs), np.stack(ys)


def delta_std(split: Split) -> np.ndarray:
    """(C,) standard deviation of the one-step input differences within each segment of ``split``
    (normalised inputs): the scale that brings the model's delta channels to unit spread."""
    d = np.concatenate([np.diff(x.reshape(-1, x.shape[-1]), axis=0) for x in split.x])
    return safe_std(d).astype(np.float32)
