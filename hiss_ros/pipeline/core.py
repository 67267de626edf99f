"""Streams in, fixed-size model chunks out: the one data path of the trainer and the live node.

Samples ``(stamp_ns, values)`` of several streams, each at its own possibly jittery rate, are
put on a fixed input clock of ``input_rate_hz`` ticks. The clock starts at the first sample of
stream 0 (the reference, e.g. the IMU) and a tick at time t is emitted once stream 0 has
reached t; every stream contributes its latest sample with stamp <= t (zero-order hold), so no
tick ever uses a sample from after its own time. One exception makes this independent of arrival
order: at a tick emitted by a stream-0 sample stamped exactly t, the other streams contribute their
latest sample before t (offline, merged in stamp order, stream 0 comes first at a tie; live, a
sample of another stream stamped t may arrive before or after it). Then per stream an optional causal low-pass
(Butterworth, second-order sections, state carried), optionally three derived channels appended
(``strapdown``: a gravity-free velocity from an IMU's gyro and accelerometer, state carried,
hiss_ros.pipeline.strapdown), normalisation, and ``chunk`` ticks make one chunk, stamped with the
time of its last tick.

Sample hygiene (``verdict``, shared with bag reading): non-finite samples and samples not later
than their stream's last used one are dropped and counted; with a normalisation, so are samples
more than ``max_abs_z`` training standard deviations from the training mean (also the first sample
of a new time line); a sample of another stream stamped more than ``max_gap_s`` ahead of the clock
stream (another time line: it would hold every later sample back), values that are not numbers or
not one flat row of the stream's size, and stamps that are not integer nanoseconds are dropped and
counted too (``ahead_of_clock``, ``not_numbers``, ``wrong_size``, ``bad_stamp``, ``unknown_stream``).
Episodes: time jumping back on
stream 0 by more than ``max_gap_s``, a gap on stream 0 longer than ``max_gap_s``, or any stream
silent for longer than ``max_gap_s`` at a tick (or whose held samples overflowed while the clock
lagged: ``held_overflow``) ends the episode: the clock, the hold values and
the filter states reset, the partial chunk is dropped, and it is counted.

``push`` takes one sample (the node); ``process`` takes whole arrays (the trainer) and runs the
very same ``push`` over the samples merged in stamp order, so both give identical chunks.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import numpy as np
from scipy import signal

from hiss_ros.data.streams import verdict
from hiss_ros.errors import ConfigError
from hiss_ros.pipeline.strapdown import Strapdown, StrapdownConfig

log = logging.getLogger(__name__)
NS = 1_000_000_000
# Normalised inputs beyond this many training standard deviations are rejected as sensor faults:
# five IMU samples of 1e30 once overflowed the float32 model state and every later estimate was NaN.
MAX_ABS_Z = 1e3
_MAX_HELD = 4096  # per stream; only reached when stream 0 (the clock) lags far behind
# Every sample ``push`` is given is counted once: "accepted", or dropped for one of these reasons.
DROP_REASONS = ("nonfinite", "duplicate", "out_of_order", "out_of_range", "wrong_size", "not_numbers", "bad_stamp",
                "unknown_stream", "ahead_of_clock")
# Stamps a ROS message can carry (builtin_interfaces/Time: int32 seconds, 1901 to 2038): outside,
# an estimate's stamp could not be published (a header 2**31-1 s with 1.5e9 ns killed the node).
_MIN_NS, _MAX_NS = -(2**31) * 10**9, 2**31 * 10**9


@dataclass(frozen=True)
class FilterConfig:
    """Causal Butterworth low-pass applied per channel on the input clock."""

    cutoff_hz: float
    order: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.cutoff_hz, (int, float)) and self.cutoff_hz > 0):
            raise ConfigError(f"filter.cutoff_hz = {self.cutoff_hz!r}: expected a positive number")
        if not (isinstance(self.order, int) and 1 <= self.order <= 8):
            raise ConfigError(f"filter.order = {self.order!r}: expected an int in 1..8")

    @classmethod
    def parse(cls, value: object) -> FilterConfig | None:
        """A config's or checkpoint's ``filter``: null, a mapping of these fields, or one already made."""
        if value is None or isinstance(value, FilterConfig):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"filter = {value!r}: expected null or a mapping such as {{cutoff_hz: 50, order: 2}}")
        try:
            return cls(**value)
        except TypeError as exc:
            raise ConfigError(f"filter: {exc}") from None


@dataclass(frozen=True)
class PipelineConfig:
    input_dims: tuple[int, ...]  # channels per input stream, stream 0 is the clock reference
    input_rate_hz: float
    output_rate_hz: float
    max_gap_s: float = 0.5
    filter: FilterConfig | None = None
    strapdown: StrapdownConfig | None = None  # 3 more channels after the inputs' (pipeline.strapdown)

    def __post_init__(self) -> None:
        dims = tuple(self.input_dims)
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ConfigError(f"pipeline.input_dims = {self.input_dims!r}: expected positive ints")
        object.__setattr__(self, "input_dims", dims)
        self.check_rates(self.input_rate_hz, self.output_rate_hz, self.max_gap_s)
        object.__setattr__(self, "filter", FilterConfig.parse(self.filter))
        if self.filter is not None:
            if self.filter.cutoff_hz >= self.input_rate_hz / 2:
                raise ConfigError(
                    f"filter.cutoff_hz = {self.filter.cutoff_hz}: must be below Nyquist ({self.input_rate_hz / 2} Hz)"
                )
        if self.strapdown is not None:
            if not isinstance(self.strapdown, StrapdownConfig):  # the stored form: channel indices
                object.__setattr__(self, "strapdown", StrapdownConfig.from_dict(self.strapdown, ()))
            n = sum(dims)
            if max(self.strapdown.gyro + self.strapdown.accel) >= n:
                raise ConfigError(f"strapdown: gyro {list(self.strapdown.gyro)} / accel {list(self.strapdown.accel)}: "
                                  f"the inputs have {n} channels")

    @staticmethod
    def check_rates(input_rate_hz: object, output_rate_hz: object, max_gap_s: object) -> None:
        """ConfigError naming a rate or gap that is not a finite positive number, or rates whose
        ratio (the chunk size) is not a whole number; also checked by a training config when read."""
        for name, v in (("input_rate_hz", input_rate_hz), ("output_rate_hz", output_rate_hz), ("max_gap_s", max_gap_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"pipeline.{name} = {v!r}: expected a positive number")
        ratio = input_rate_hz / output_rate_hz
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise ConfigError(
                f"pipeline: input_rate_hz / output_rate_hz = {input_rate_hz} / {output_rate_hz} "
                f"= {ratio:g} must be a whole number (the chunk size)"
            )

    @property
    def chunk(self) -> int:
        return round(self.input_rate_hz / self.output_rate_hz)

    @property
    def channels(self) -> int:
        """Channels of a chunk: the inputs' and then the derived ones (strapdown: 3)."""
        return sum(self.input_dims) + (3 if self.strapdown is not None else 0)


@dataclass
class Chunk:
    stamp_ns: int  # time of the chunk's last tick: the estimate's time
    x: np.ndarray  # (chunk, channels) filtered; float32 normalised (float64 raw without a Normalization)
    episode: int  # increments at every reset


@dataclass
class Episode:
    stamps_ns: np.ndarray  # (K,) int64
    x: np.ndarray  # (K, chunk, channels), as Chunk.x


def safe_std(a: np.ndarray) -> np.ndarray:
    """Per-column standard deviation of a (N, C); a constant column keeps 1 (nothing to scale)."""
    s = a.std(0)
    return np.where(s > 1e-8, s, 1.0)


@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of the training data: the model sees ``(value - mean) / std`` on
    its inputs and predicts its outputs in the same units. Fitted once by the dataset on training
    data only, stored in the checkpoint, applied by the pipeline (inputs, here) and by the serving
    estimator (outputs): one object on both sides, so training and serving cannot drift apart."""

    input_mean: np.ndarray  # (C,) float64, C = sum of the input streams' channels
    input_std: np.ndarray  # (C,) float64, > 0
    output_mean: np.ndarray  # (O,) float64
    output_std: np.ndarray  # (O,) float64, > 0

    KEYS = ("input_mean", "input_std", "output_mean", "output_std")

    def __post_init__(self) -> None:
        for key in self.KEYS:
            v = np.asarray(getattr(self, key), dtype=np.float64)
            if v.ndim != 1 or not v.size or not np.isfinite(v).all():
                raise ConfigError(f"normalization.{key}: expected a non-empty list of finite numbers, got {v.tolist()}")
            if key.endswith("std") and (v <= 0).any():
                raise ConfigError(f"normalization.{key}: every std must be > 0, got {v.tolist()}")
            v.flags.writeable = False
            object.__setattr__(self, key, v)
        for side in ("input", "output"):
            mean, std = getattr(self, f"{side}_mean"), getattr(self, f"{side}_std")
            if mean.shape != std.shape:
                raise ConfigError(f"normalization: {side}_mean has {mean.size} channels, {side}_std {std.size}")

    @classmethod
    def identity(cls, inputs: int, outputs: int) -> Normalization:
        return cls(np.zeros(inputs), np.ones(inputs), np.zeros(outputs), np.ones(outputs))

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> Normalization:
        """Statistics of input rows x (N, C) and targets y (N', O)."""
        return cls(x.mean(0), safe_std(x), y.mean(0), safe_std(y))

    @classmethod
    def from_dict(cls, data: object) -> Normalization:
        if not isinstance(data, dict) or set(data) != set(cls.KEYS):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"normalization: expected the keys {list(cls.KEYS)}, got {got}")
        return cls(*(data[k] for k in cls.KEYS))

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in self.KEYS}

    def inputs(self, raw: np.ndarray) -> np.ndarray:
        """Raw input rows (..., C) -> the model's float32 units (computed in float64, then cast:
        bit-identical wherever the same rows are normalised)."""
        return ((raw - self.input_mean) / self.input_std).astype(np.float32)

    def outputs(self, y: np.ndarray) -> np.ndarray:
        """Physical targets (..., O) -> the model's float32 units."""
        return ((y - self.output_mean) / self.output_std).astype(np.float32)

    def physical(self, y: np.ndarray) -> np.ndarray:
        """Model outputs (..., O) -> float64 physical units."""
        return np.asarray(y, dtype=np.float64) * self.output_std + self.output_mean

    def physical_floats(self, y: list[float]) -> list[float]:
        """One model output (O,) as Python floats -> physical units: ``physical`` without a numpy call
        (the same float64 operations, so the same results), for the serving path, where each numpy
        call's fixed cost, on caches gone cold between estimates, is most of the work."""
        return [v * s + m for v, s, m in zip(y, self._output_floats[0], self._output_floats[1], strict=True)]

    @cached_property
    def _output_floats(self) -> tuple[list[float], list[float]]:
        return self.output_std.tolist(), self.output_mean.tolist()


class _Held:
    """Samples of one stream not yet superseded on the clock: the value at tick t is the latest
    sample with stamp <= t, even when later samples of this stream have already arrived."""

    def __init__(self) -> None:
        self.samples: deque[tuple[int, np.ndarray]] = deque(maxlen=_MAX_HELD)
        self.last_stamp_ns: int | None = None  # newest accepted stamp

    def add(self, stamp_ns: int, value: np.ndarray) -> None:
        self.samples.append((stamp_ns, value))
        self.last_stamp_ns = stamp_ns

    def at(self, t_ns: int) -> tuple[int, np.ndarray] | None:
        s = self.samples
        while len(s) >= 2 and s[1][0] <= t_ns:
            s.popleft()
        return s[0] if s and s[0][0] <= t_ns else None


class Pipeline:
    """``normalization`` None: chunks hold the filtered float64 input rows (what the dataset fits
    statistics on, then normalises with ``Normalization.inputs`` exactly as this pipeline does)."""

    def __init__(self, config: PipelineConfig, normalization: Normalization | None = None,
                 max_abs_z: float = MAX_ABS_Z) -> None:
        self.config = config
        self.normalization = normalization
        self._limits: list[tuple[np.ndarray, np.ndarray]] | None = None  # per stream: (mean, max |value - mean|)
        if normalization is not None:
            if normalization.input_mean.shape != (config.channels,):
                raise ConfigError(
                    f"normalization has {normalization.input_mean.size} input channels, pipeline has {config.channels}"
                )
            edges = np.cumsum((0, *config.input_dims))
            self._limits = [(normalization.input_mean[a:b], max_abs_z * normalization.input_std[a:b])
                            for a, b in pairwise(edges)]
        self._period_ns = NS / config.input_rate_hz
        self._max_gap_ns = int(config.max_gap_s * NS)
        self._sos = (
            signal.butter(config.filter.order, config.filter.cutoff_hz, fs=config.input_rate_hz, output="sos")
            if config.filter else None
        )
        self._strapdown = Strapdown(config.strapdown, config.input_rate_hz) if config.strapdown else None
        self.counters: Counter[str] = Counter()
        self.episode = 0
        self._reset()

    def _reset(self) -> None:
        if self._strapdown is not None:
            self._strapdown.reset()
        self._streams = [_Held() for _ in self.config.input_dims]
        self._clock0: int | None = None
        self._tick = 0  # index of the next tick to emit
        self._rows: list[np.ndarray] = []
        self._emitting = False  # a tick of this episode was emitted (every stream has contributed)
        self._zi: np.ndarray | None = None

    def restart(self, reason: str) -> None:
        """End the episode: the next chunk starts afresh (clock, held values, filter); ``reason`` is counted."""
        self.counters[reason] += 1
        log.info("input stream break (%s): new episode", reason)
        if self._clock0 is not None:
            self.episode += 1
        self._reset()

    def span_ns(self, ticks: int) -> int:
        """How long ``ticks`` input-clock periods are, as the clock places its ticks (ns)."""
        return round(ticks * self._period_ns)

    def _tick_ns(self, k: int) -> int:
        return self._clock0 + self.span_ns(k)

    def next_chunk_ns(self) -> int | None:
        """The time of the next chunk's last tick: until a clock-stream sample stamped at or after
        it arrives, no sample completes a chunk (unless the clock restarts, which then starts at
        one of those samples' stamps); None before the clock starts."""
        if self._clock0 is None:
            return None
        return self._tick_ns(self._tick + self.config.chunk - len(self._rows) - 1)

    def push(self, stream: int, stamp_ns: int, values: Sequence[float] | np.ndarray) -> list[Chunk]:
        """Feed one sample; returns the chunks it completed (usually none or one)."""
        if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) \
                or not 0 <= stream < len(self.config.input_dims):
            self.counters["unknown_stream"] += 1
            return []
        if (isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer))
                or not _MIN_NS <= stamp_ns < _MAX_NS):
            self.counters["bad_stamp"] += 1  # not integer nanoseconds (None, NaN, a float), or no ROS time
            return []
        stream, stamp_ns = int(stream), int(stamp_ns)
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):  # text, None, ragged lists, ...
            self.counters["not_numbers"] += 1
            return []
        if v.ndim > 1 or v.size != self.config.input_dims[stream]:
            self.counters["wrong_size"] += 1
            return []
        v = v.reshape(-1)
        st = self._streams[stream]
        last = st.last_stamp_ns
        limits = self._limits
        inside = limits is None or bool((np.abs(v - limits[stream][0]) <= limits[stream][1]).all())  # NaN: False
        # The common case live (within range, so finite, and later than the stream's last sample)
        # skips ``verdict``, which would pass it; anything else it classifies, in the same order.
        in_order = last is None or stamp_ns > last
        reason = None if limits is not None and inside and in_order else verdict(last, stamp_ns, v)
        if reason is not None:
            # The clock stream jumping back by more than a gap (a restarted simulation, a looped
            # bag) is a new time line, not a late sample.
            if stream == 0 and reason == "out_of_order" and last - stamp_ns > self._max_gap_ns:
                self.restart("time_backwards")
                st = self._streams[0]
                if not inside:  # a new time line, but its first sample must pass the range check too
                    self.counters["out_of_range"] += 1
                    return []
            else:
                self.counters[reason] += 1
                return []
        elif not inside:
            self.counters["out_of_range"] += 1  # finite but absurd (a sensor fault): it would swamp the model state
            return []
        elif stream == 0 and last is not None and stamp_ns - last > self._max_gap_ns:
            self.restart("gap")
            st = self._streams[0]
        if stream != 0:
            clock = self._streams[0].last_stamp_ns
            if clock is not None and stamp_ns - clock > self._max_gap_ns:
                # Stamped further ahead of the clock stream than any gap: another time line (a
                # receipt stamp against header stamps), which would hold every later sample back.
                self.counters["ahead_of_clock"] += 1
                return []
        if len(st.samples) == _MAX_HELD:
            self.counters["held_overflow"] += 1  # the oldest held sample is lost (the clock lags far behind)
        st.add(stamp_ns, v)
        self.counters["accepted"] += 1
        if stream != 0:
            return []
        if self._clock0 is None:
            self._clock0 = stamp_ns
            self._drop_ahead(stamp_ns)
        return self._emit_until(stamp_ns)

    def _drop_ahead(self, clock_ns: int) -> None:
        """When the clock starts: samples of the other streams held from before it, stamped further
        ahead of it than a gap, are dropped as ``push`` drops them afterwards (their stream then
        takes samples from the clock's time line)."""
        for st in self._streams[1:]:
            kept = [(t, v) for t, v in st.samples if t - clock_ns <= self._max_gap_ns]
            if len(kept) < len(st.samples):  # counted once: no longer accepted, dropped
                self.counters["ahead_of_clock"] += len(st.samples) - len(kept)
                self.counters["accepted"] -= len(st.samples) - len(kept)
                st.samples.clear()
                st.samples.extend(kept)
                st.last_stamp_ns = kept[-1][0] if kept else None

    def _emit_until(self, stamp_ns: int) -> list[Chunk]:
        """Emit every tick at or before ``stamp_ns`` (the newest time stream 0 has reached)."""
        out: list[Chunk] = []
        while (t := self._tick_ns(self._tick)) <= stamp_ns:
            others_at = t - 1 if t == stamp_ns else t  # a tie with the emitting sample enters at the next tick
            held = [self._streams[0].at(t), *(s.at(others_at) for s in self._streams[1:])]
            if any(h is None for h in held):
                if self._emitting:  # a stream's samples up to t were lost (held_overflow): a hole
                    self.restart("stream_silent")
                    return out
                self._tick += 1  # waiting for data on some stream: nothing to emit yet
                self.counters["ticks_waiting"] += 1
                continue
            if any(t - h[0] > self._max_gap_ns for h in held):
                self.restart("stream_silent")
                return out
            self._rows.append(np.concatenate([h[1] for h in held]))
            self._emitting = True
            self._tick += 1
            if len(self._rows) == self.config.chunk:
                out.append(Chunk(t, self._chunk_values(np.stack(self._rows)), self.episode))
                self._rows = []
        return out

    def _chunk_values(self, raw: np.ndarray) -> np.ndarray:
        """(chunk, C) raw rows -> filtered (state carried), the derived channels appended (from
        the unfiltered rows, state carried) and normalised model input."""
        derived = self._strapdown.rows(raw) if self._strapdown is not None else None
        if self._sos is not None:
            if self._zi is None:  # start in steady state at the first value: no start-up transient
                self._zi = signal.sosfilt_zi(self._sos)[:, :, None] * raw[0]  # (sections, 2, C)
            raw, self._zi = signal.sosfilt(self._sos, raw, axis=0, zi=self._zi)
        if derived is not None:
            raw = np.concatenate([raw, derived], axis=1)
        return raw if self.normalization is None else self.normalization.inputs(raw)

    def process(self, streams: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Episode]:
        """Whole arrays ``[(stamps_ns (n,), values (n, dims)), ...]`` per input stream -> episodes.
        Runs ``push`` over all samples merged in stamp order (ties: lower stream first)."""
        if len(streams) != len(self.config.input_dims):
            raise ConfigError(f"pipeline: {len(streams)} input streams given, configured {len(self.config.input_dims)}")
        stamps = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in streams])
        which = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(streams)])
        index = np.concatenate([np.arange(len(t)) for t, _ in streams])
        order = np.lexsort((which, stamps))
        episodes: dict[int, list[Chunk]] = {}
        for j in order:
            for c in self.push(int(which[j]), int(stamps[j]), streams[which[j]][1][index[j]]):
                episodes.setdefault(c.episode, []).append(c)
        return [Episode(np.array([c.stamp_ns for c in cs], dtype=np.int64), np.stack([c.x for c in cs]))
                for cs in episodes.values()]

