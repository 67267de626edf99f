"""Streams in, fixed-size model chunks out: the one data path of the trainer and the live node.

Samples ``(stamp_ns, values)`` of several streams, each at its own possibly jittery rate, are
put on a fixed input clock of ``input_rate_hz`` ticks. The clock starts at the first sample of
stream 0 (the reference, e.g. the IMU) and a tick at time t is emitted once stream 0 has
reached t; every stream contributes its latest sample with stamp <= t (zero-order hold), so no
tick ever uses a sample from after its own time. Then per stream an optional causal low-pass
(Butterworth, second-order sections, state carried), normalisation, and ``chunk`` ticks make
one chunk, stamped with the time of its last tick.

Episodes: time going backwards on stream 0, a gap on stream 0 longer than ``max_gap_s``, or any
stream silent for longer than ``max_gap_s`` at a tick ends the episode: the clock, the hold
values and the filter states reset, the partial chunk is dropped, and it is counted.

``push`` takes one sample (the node); ``process`` takes whole arrays (the trainer) and runs the
very same ``push`` over the samples merged in stamp order, so both give identical chunks.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import signal

from hiss_ros.errors import ConfigError

log = logging.getLogger(__name__)
NS = 1_000_000_000
_MAX_HELD = 4096  # per stream; only reached when stream 0 (the clock) lags far behind


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


@dataclass(frozen=True)
class PipelineConfig:
    input_dims: tuple[int, ...]  # channels per input stream, stream 0 is the clock reference
    input_rate_hz: float
    output_rate_hz: float
    max_gap_s: float = 0.5
    filter: FilterConfig | None = None

    def __post_init__(self) -> None:
        dims = tuple(self.input_dims)
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ConfigError(f"pipeline.input_dims = {self.input_dims!r}: expected positive ints")
        object.__setattr__(self, "input_dims", dims)
        for name in ("input_rate_hz", "output_rate_hz", "max_gap_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"pipeline.{name} = {v!r}: expected a positive number")
        ratio = self.input_rate_hz / self.output_rate_hz
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise ConfigError(
                f"pipeline: input_rate_hz / output_rate_hz = {self.input_rate_hz} / {self.output_rate_hz} "
                f"= {ratio:g} must be a whole number (the chunk size)"
            )
        if self.filter is not None:
            if isinstance(self.filter, dict):
                object.__setattr__(self, "filter", FilterConfig(**self.filter))
            if self.filter.cutoff_hz >= self.input_rate_hz / 2:
                raise ConfigError(
                    f"filter.cutoff_hz = {self.filter.cutoff_hz}: must be below Nyquist ({self.input_rate_hz / 2} Hz)"
                )

    @property
    def chunk(self) -> int:
        return round(self.input_rate_hz / self.output_rate_hz)

    @property
    def channels(self) -> int:
        return sum(self.input_dims)


@dataclass
class Chunk:
    stamp_ns: int  # time of the chunk's last tick: the estimate's time
    x: np.ndarray  # (chunk, channels) float32, filtered and normalised
    episode: int  # increments at every reset


@dataclass
class Episode:
    stamps_ns: np.ndarray  # (K,) int64
    x: np.ndarray  # (K, chunk, channels) float32


@dataclass
class Normalization:
    mean: np.ndarray  # (channels,)
    std: np.ndarray  # (channels,)

    @classmethod
    def identity(cls, channels: int) -> Normalization:
        return cls(np.zeros(channels), np.ones(channels))


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
    def __init__(self, config: PipelineConfig, normalization: Normalization | None = None) -> None:
        self.config = config
        self.normalization = normalization or Normalization.identity(config.channels)
        if self.normalization.mean.shape != (config.channels,):
            raise ConfigError(
                f"normalization has {self.normalization.mean.shape} channels, pipeline has {config.channels}"
            )
        self._period_ns = NS / config.input_rate_hz
        self._max_gap_ns = int(config.max_gap_s * NS)
        self._sos = (
            signal.butter(config.filter.order, config.filter.cutoff_hz, fs=config.input_rate_hz, output="sos")
            if config.filter else None
        )
        self.counters: Counter[str] = Counter()
        self.episode = 0
        self._reset()

    def _reset(self) -> None:
        self._streams = [_Held() for _ in self.config.input_dims]
        self._clock0: int | None = None
        self._tick = 0  # index of the next tick to emit
        self._rows: list[np.ndarray] = []
        self._zi: list[np.ndarray] | None = None

    def _end_episode(self, reason: str) -> None:
        self.counters[reason] += 1
        log.info("input stream break (%s): new episode", reason)
        if self._clock0 is not None:
            self.episode += 1
        self._reset()

    def _tick_ns(self, k: int) -> int:
        return self._clock0 + round(k * self._period_ns)

    def push(self, stream: int, stamp_ns: int, values: Sequence[float] | np.ndarray) -> list[Chunk]:
        """Feed one sample; returns the chunks it completed (usually none or one)."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if not 0 <= stream < len(self.config.input_dims):
            self.counters["unknown_stream"] += 1
            return []
        if v.shape[0] != self.config.input_dims[stream]:
            self.counters["wrong_size"] += 1
            return []
        if not np.isfinite(v).all():
            self.counters["nonfinite"] += 1
            return []
        st = self._streams[stream]
        last = st.last_stamp_ns
        if last is not None and stamp_ns <= last:
            if stream == 0 and stamp_ns < last:
                self._end_episode("time_backwards")
                st = self._streams[0]
            else:
                self.counters["duplicate_or_late" if stamp_ns == last else "out_of_order"] += 1
                return []
        elif stream == 0 and last is not None and stamp_ns - last > self._max_gap_ns:
            self._end_episode("gap")
            st = self._streams[0]
        st.add(stamp_ns, v)
        self.counters["accepted"] += 1
        if stream != 0:
            return []
        if self._clock0 is None:
            self._clock0 = stamp_ns
        return self._emit_until(stamp_ns)

    def _emit_until(self, stamp_ns: int) -> list[Chunk]:
        """Emit every tick at or before ``stamp_ns`` (the newest time stream 0 has reached)."""
        out: list[Chunk] = []
        while (t := self._tick_ns(self._tick)) <= stamp_ns:
            held = [s.at(t) for s in self._streams]
            if any(h is None for h in held):
                self._tick += 1  # waiting for data on some stream: nothing to emit yet
                self.counters["ticks_waiting"] += 1
                continue
            if any(t - h[0] > self._max_gap_ns for h in held):
                self._end_episode("stream_silent")
                return out
            self._rows.append(self._row(np.concatenate([h[1] for h in held])))
            self._tick += 1
            if len(self._rows) == self.config.chunk:
                out.append(Chunk(t, np.stack(self._rows).astype(np.float32), self.episode))
                self._rows = []
        return out

    def _row(self, raw: np.ndarray) -> np.ndarray:
        if self._sos is not None:
            if self._zi is None:  # start in steady state at the first value: no start-up transient
                self._zi = signal.sosfilt_zi(self._sos)[:, :, None] * raw  # (sections, 2, channels)
            y, self._zi = signal.sosfilt(self._sos, raw[None, :], axis=0, zi=self._zi)
            raw = y[0]
        return (raw - self.normalization.mean) / self.normalization.std

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

