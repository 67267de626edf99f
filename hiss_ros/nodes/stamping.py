"""The estimator's sample times: each input stamped by its header or on receipt, as it was in training.

Per input, the stream's ``stamp`` setting decides; ``auto`` stamps as training did (the checkpoint
records it), or, for a checkpoint that does not say, by the header where the message has one; in
either case a header stamp of zero on the first message means the receipt (a driver that leaves
stamps at zero is said once, not dropped as duplicates). Receipt stamps are put on the clock stream's time line
when the clock stream is header-stamped (its stamp minus the steady clock, so their spacing is
true whatever the /clock rate; only the samples the pipeline takes move it), else they are the
node's clock at the receipt (sim time honoured: its time now, less the steady time since the
receipt; samples are processed in batches; under a coarse sim /clock, whose time stands still
between ticks, such samples get 1 ns apart rather than out of order).
Imports without ROS: the node passes its clock and logger in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hiss_ros.data.streams import StreamSpec, header_stamp_ns, uses_header


class Stamps:
    def __init__(self, inputs: tuple[StreamSpec, ...], trained: tuple[str, ...] | None, max_gap_ns: int,
                 now_ns: Callable[[], int], warn: Callable[[str], None]) -> None:
        self.inputs, self.trained, self.max_gap_ns = inputs, trained, max_gap_ns
        self.now_ns, self.warn = now_ns, warn
        self.header: list[bool | None] = [None] * len(inputs)  # per input, decided on its first message
        self.steady_offset: int | None = None  # clock-stream stamp minus steady time
        self.last = [0] * len(inputs)

    def source(self, i: int, msg: Any) -> bool:
        """Decide input ``i``'s stamp source from its first message; True: the header."""
        spec = self.inputs[i]
        use = uses_header(spec, msg)
        if use and spec.stamp == "auto" and self.trained and self.trained[i] == "receive":
            use = False  # trained on receive times (its header stamps were unusable there): the same here
        topic = spec.relative_topic
        if spec.stamp == "auto" and not use and header_stamp_ns(msg) is not None:
            self.warn(f"{topic}: header stamp is zero (a driver that does not set it?): stamping on receipt")
        trained = self.trained[i] if self.trained else None
        if trained is not None and trained != ("header" if use else "receive"):
            self.warn(f"{topic}: stamped by {'header' if use else 'receipt'} here, but by {trained} in training: "
                      "estimates may be off by the difference (set stamp: on the stream and retrain to match)")
        self.header[i] = use
        return use

    def __call__(self, i: int, header_ns: int | None, steady: int, msg: Any = None) -> int:
        """Input ``i``'s sample stamp: its header stamp ``header_ns`` or its receipt ``steady`` (the
        first message of each input, ``msg``, decides which)."""
        use = self.header[i]
        if use is None:
            use = self.source(i, msg)
        if use:
            return header_ns
        if self.steady_offset is None:  # the clock stream itself is stamped on receipt: the node's clock then
            stamp = self.now_ns() - (time.monotonic_ns() - steady)
        else:  # receipt on the clock stream's time line
            stamp = steady + self.steady_offset
        # Jitter of either mapping (a coarse sim /clock: its time stands still between ticks) never
        # gives a stamp twice or out of order; a jump of the time line (more than a gap back) is followed.
        last = self.last[i]
        if last - self.max_gap_ns < stamp <= last:
            stamp = last + 1
        self.last[i] = stamp
        return stamp

    def anchor(self, stamp: int, steady: int) -> None:
        """The clock stream's sample stamped ``stamp`` (its header), received at ``steady``, was
        taken by the pipeline: receipt stamps follow its time line. A sample the pipeline dropped
        (NaN, a stamp far ahead) must not move it."""
        if self.header[0]:
            self.steady_offset = stamp - steady
