"""Samples held back until a chunk may be due, then processed together (the estimator's batching
with ``intake:=callbacks``; the default paced intake, ``hiss_ros.nodes.pacing``, does not take
them before then at all).

At IMU 1 kHz, the estimator's callback ran once a millisecond for a few microseconds of work, on a
core that had gone idle in between: each sample paid for cold caches (an IMU sample cost about 31 us
of CPU when the node's callback was fed one message every 0.9 ms, 8 us back to back; the node's CPU
against the node before this, docs/BENCHMARKS.md). ``Deferral`` holds the raw bytes of samples
that cannot complete a chunk and hands them back, in arrival order, with the first sample that
might (or a couple of samples before it, see ``margin_ns``): the node then decodes
and pushes them one after the other, warm. Estimates are not delayed: samples within ``margin_ns``
of the next chunk's time are not held, so the held batch is processed a few samples before the
one that completes the chunk.

What is held changes nothing downstream: the node processes every sample in the order it arrived,
with the receipt time it arrived at. A sample is held only when no chunk can come out of it: a
clock-stream (stream 0) sample stamped before both the pipeline's next chunk time
(``Pipeline.next_chunk_ns``, from the pipeline as it was before the held samples; they can only
move it later) and a whole chunk after the earliest clock stamp held (a clock restarted by any held
sample, after a gap or a jump back, starts at one of their stamps), each less the margin; any other
stream's sample (only the clock stream completes chunks). Bounded: at most ``max_held`` samples,
none older than ``max_age_ns`` (a silent clock stream), and ``flush`` hands everything back (the
node's diagnostics, reset, reload and deactivation call it). No ROS here: the node decides which
samples may wait at all (see ``Estimator._on_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from hiss_ros.pipeline import Pipeline

T = TypeVar("T")


class Deferral(Generic[T]):
    def __init__(self, pipeline: Pipeline, margin_ns: int, max_held: int = 64, max_age_ns: int = 50_000_000) -> None:
        self.pipeline, self.margin_ns, self.max_held, self.max_age_ns = pipeline, margin_ns, max_held, max_age_ns
        self.chunk_ns = pipeline.span_ns(pipeline.config.chunk - 1)  # first to last tick of a chunk
        self.held: list[T] = []
        self.since = 0  # receipt time of the oldest held sample
        self.first: int | None = None  # the earliest clock-stream stamp held
        self.batched = 0  # samples that were held, then handed back (diagnostics: samples_batched)

    def offer(self, stream: int, stamp_ns: int | None, now_ns: int, item: T) -> Sequence[T]:
        """Input ``stream``'s sample ``item`` (its stamp ``stamp_ns`` for the clock stream; None:
        it may not wait) -> what to process now, in arrival order: nothing (it is held), or the held
        samples and then it."""
        held = self.held
        if stamp_ns is not None and len(held) < self.max_held and (not held or now_ns - self.since <= self.max_age_ns):
            if stream != 0:
                return self._hold(item, now_ns)
            first = stamp_ns if self.first is None else min(self.first, stamp_ns)
            due = self.pipeline.next_chunk_ns()
            limit = first + self.chunk_ns if due is None else min(due, first + self.chunk_ns)
            if stamp_ns < limit - self.margin_ns:
                self.first = first
                return self._hold(item, now_ns)
        if not held:
            return (item,)
        out = [*held, item]
        self._clear()
        return out

    def flush(self) -> list[T]:
        """Everything held, in arrival order; nothing is held afterwards."""
        out = list(self.held)
        self._clear()
        return out

    def _hold(self, item: T, now_ns: int) -> tuple[()]:
        if not self.held:
            self.since = now_ns
        self.held.append(item)
        return ()

    def _clear(self) -> None:
        self.batched += len(self.held)
        self.held.clear()
        self.first = None
